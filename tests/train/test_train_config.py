"""Configuration: YAML + overrides are typed and validated; every shipped recipe config loads."""

from pathlib import Path

import pytest

from fastllava.config import load_config, parse_args, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
BASE = ["model.source=scratch", "model.architecture={}", "data.kind=synthetic"]


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key optim.lrr in section 'optim'; allowed: lr, projector_lr"),
    (["nosuch.x=1"], "unknown key nosuch in the top level; allowed: model, data, optim"),
    (["parallel.frozen_llm=mirror"], "parallel.frozen_llm: 'mirror' is not allowed; choose one of 'shard', 'replicate'"),
    (["parallel.activation_checkpointing=some"], "choose one of 'none', 'full', 'selective'"),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["train.max_steps=2.5"], "train.max_steps: expected an integer, got 2.5"),
    (["train.unfreeze_vision=maybe"], "train.unfreeze_vision: expected true or false"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1)"),
    (["train.stage=align", "train.unfreeze_vision=true"], "unfreeze_vision=true is a stage-2 option"),
    (["data.max_tokens_per_pack=100"], "must be >= data.model_max_length"),
    (["lr"], "expected section.key=value"),
    (["model.vision_pretrain_steps=-1"], "model.vision_pretrain_*: need steps >= 0, batch >= 2 and lr > 0"),
    (["model.vision_pretrain_batch=1"], "model.vision_pretrain_*: need steps >= 0, batch >= 2 and lr > 0"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, BASE + override)
    assert message in str(e.value)


def test_missing_sources_are_named():
    with pytest.raises(ValueError, match=r"model.source='components' needs model.vision_path, model.llm_path"):
        load_config(None, ["data.kind=synthetic"])
    with pytest.raises(ValueError, match="data.kind='llava' needs data.data_path"):
        load_config(None, ["model.source=scratch", "model.architecture={}"])


def test_vision_pretraining_is_for_scratch_towers():
    with pytest.raises(ValueError, match="model.source='pretrained' already brings a trained one"):
        load_config(None, ["model.source=pretrained", "model.pretrained_path=x", "data.kind=synthetic",
                           "model.vision_pretrain_steps=10"])


def test_overrides_are_typed():
    cfg = load_config(None, BASE + ["optim.lr=2e-5", "optim.betas=[0.9, 0.95]", "train.max_steps=7",
                                    "model.projector_weights=null", "checkpoint.resume=none"])
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.max_steps == 7 and cfg.checkpoint.resume == "none"
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], "1e-3")  # a string until the float field takes it


def test_file_base_and_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {source: scratch, architecture: {}}\ndata: {kind: synthetic}\n"
                                        "optim: {lr: 0.5}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptim: {weight_decay: 0.1}\n")
    cfg = parse_args(["--config", str(tmp_path / "run.yaml"), "optim.lr=0.25"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.25, 0.1)
    (tmp_path / "bad.yaml").write_text("base: base.yaml\noptim: {lr: high}\n")
    with pytest.raises(ValueError, match=r"optim.lr: expected a number, got 'high' \(in .*bad.yaml\)"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="unknown flag '--lr'"):
        parse_args(["--lr", "3"])


def test_paper_recipes():
    for size in ("7b", "13b"):
        s1 = load_config(CONFIGS / f"llava15_{size}_pretrain.yaml")
        assert (s1.train.stage, s1.optim.lr, s1.train.global_batch_size, s1.train.epochs) == ("align", 1e-3, 256, 1)
        assert (s1.optim.warmup_ratio, s1.optim.schedule, s1.optim.weight_decay) == (0.03, "cosine", 0.0)
        assert (s1.data.model_max_length, s1.data.image_mode, s1.data.template) == (2048, "square", "plain")
        assert (s1.model.vision_feature_layer, s1.model.projector_type) == (-2, "mlp2x_gelu")
        assert "clip-vit-large-patch14-336" in s1.model.vision_path
        s2 = load_config(CONFIGS / f"llava15_{size}_finetune.yaml")
        assert (s2.train.stage, s2.optim.lr, s2.train.global_batch_size, s2.train.epochs) == ("finetune", 2e-5, 128, 1)
        assert (s2.data.image_mode, s2.data.template, s2.train.unfreeze_vision) == ("pad", "vicuna_v1", False)
        assert s2.model.projector_weights == f"{s1.train.output_dir}/projector.safetensors"
        assert size in s2.model.llm_path
    demo = load_config(CONFIGS / "demo_finetune.yaml")
    assert demo.data.kind == "synthetic" and demo.eval.enabled
    pre = load_config(CONFIGS / "demo_pretrain.yaml")
    assert pre.train.stage == "align" and pre.data.template == "plain" and pre.model.source == "scratch"
