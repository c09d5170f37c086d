"""Configuration: YAML + overrides are typed and validated by OmegaConf and the dataclasses; every shipped
recipe config loads; mistakes name the key and what is allowed."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from fastllava.config import load_config, split_args

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
BASE = ["model.source=scratch", "model.architecture={}"]


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key optim.lrr in section 'optim'; allowed: lr, projector_lr"),
    (["nosuch.x=1"], "unknown key nosuch in the top level; allowed: model, data, optim"),
    (["model.architecture.vision.depth=1"], "unknown key model.architecture.vision.depth in section "
                                            "'model.architecture.vision'; allowed: hidden_size"),
    (["parallel.frozen_llm=mirror"], "parallel.frozen_llm: Invalid value 'mirror', expected one of ['shard', 'replicate']"),
    (["parallel.activation_checkpointing=some"], "expected one of ['none', 'full', 'selective']"),
    (["parallel.replicate=0"], "parallel.replicate must be >= 1 (1: shard over all ranks; R > 1: HSDP"),
    (["optim.lr=fast"], "optim.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["train.max_steps=2.5"], "train.max_steps: Value '2.5' of type 'float' could not be converted to Integer"),
    (["train.unfreeze_vision=maybe"], "train.unfreeze_vision: Value 'maybe' is not a valid bool"),
    (["optim.betas=[0.9]"], "length 1 does not match type hint length 2"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1)"),
    (["train.stage=align", "train.unfreeze_vision=true"], "unfreeze_vision=true is a stage-2 option"),
    (["data.max_tokens_per_pack=100"], "must be >= data.model_max_length"),
    (["data.template=v9"], "data.template: unknown conversation template 'v9'; known: ['chatml_direct', 'llama3', "
                                   "'mistral', 'mistral_instruct', 'plain', 'qwen', 'v0', 'vicuna_v1']"),
    (["model.backends.attention=cudnn"], "attention backend 'cudnn' is not supported; choose one of 'auto'"),
    (["model.architecture.projector_type=mlp0x_gelu"], "projector_type must be 'linear' or 'mlpNx_gelu'"),
    (["lr"], "expected section.key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, BASE + override)
    assert message in str(e.value)


def test_model_sources_are_checked():
    with pytest.raises(ValueError, match=r"model.source='components' needs model.vision_path, model.llm_path"):
        load_config(None, [])
    with pytest.raises(ValueError, match=r"model.source='scratch' needs model.architecture"):
        load_config(None, ["model.source=scratch"])
    with pytest.raises(ValueError, match="the checkpoint at model.pretrained_path defines the architecture"):
        load_config(None, ["model.source=pretrained", "model.pretrained_path=x", "model.architecture={}"])
    components = ["model.source=components", "model.vision_path=v", "model.llm_path=l"]
    with pytest.raises(ValueError, match=r"model.architecture.vision: with model.source='components'"):
        load_config(None, components + ["model.architecture.vision.hidden_size=32",
                                        "model.architecture.vision.num_attention_heads=4"])
    cfg = load_config(None, components + ["model.architecture.vision_feature_layer=-1"])
    assert cfg.model.connector() == {"projector_type": "mlp2x_gelu", "vision_feature_layer": -1,
                                     "vision_feature_select": "patch"}
    assert load_config(None, components).model.connector()["vision_feature_layer"] == -2  # LLaVA-1.5's


def test_overrides_are_typed_and_nested_configs_are_whole():
    cfg = load_config(None, BASE + ["optim.lr=2e-5", "optim.betas=[0.9, 0.95]", "train.max_steps=7",
                                    "model.projector_weights=null", "checkpoint.resume=none",
                                    "model.architecture.text={hidden_size: 64, num_attention_heads: 4, "
                                    "num_key_value_heads: 2}"])
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.max_steps == 7 and cfg.checkpoint.resume == "none"
    # The head width follows the patched sizes, not the defaults the tree was built from.
    assert cfg.model.architecture.text.attention_head_dim == 16


def test_file_base_and_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {source: scratch, architecture: {}}\noptim: {lr: 0.5}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptim: {weight_decay: 0.1}\n")
    path, overrides = split_args(["--config", str(tmp_path / "run.yaml"), "optim.lr=0.25"])
    cfg = load_config(path, overrides)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.25, 0.1)
    (tmp_path / "bad.yaml").write_text("base: base.yaml\noptim: {lr: high}\n")
    with pytest.raises(ValueError, match=r"optim.lr: Value 'high'.* \(in .*bad.yaml\)"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown flag '--lr'"):
        split_args(["--lr", "3"])
    with pytest.raises(ValueError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_hsdp_mesh_needs_replicate_to_divide_the_world(tmp_path):
    assert load_config(None, BASE).parallel.mesh_shape(8) == (8,)  # the default: FSDP over all ranks
    parallel = load_config(None, BASE + ["parallel.replicate=4"]).parallel
    assert parallel.mesh_shape(32) == (4, 8)  # 4 nodes x 8 GPUs: shard within a node, replicate across
    with pytest.raises(ValueError, match=r"parallel.replicate=4 must divide the number of ranks \(world size 6\)"):
        parallel.mesh_shape(6)
    # The world size is known once the run starts: a one-process run with replicate=2 stops there.
    from train_tiny import ToyDataset, run, tiny_config
    with pytest.raises(ValueError, match=r"parallel.replicate=2 must divide .*world size 1"):
        run(tiny_config(tmp_path, "parallel.replicate=2"), dataset=ToyDataset(8))


def test_paper_recipes():
    for size in ("7b", "13b"):
        s1 = load_config(CONFIGS / f"llava15_{size}_pretrain.yaml")
        assert (s1.train.stage, s1.optim.lr, s1.train.global_batch_size, s1.train.epochs) == ("align", 1e-3, 256, 1)
        assert (s1.optim.warmup_ratio, s1.optim.schedule, s1.optim.weight_decay) == (0.03, "cosine", 0.0)
        assert (s1.data.model_max_length, s1.data.image_mode, s1.data.template) == (2048, "square", "plain")
        assert s1.model.connector() == {"projector_type": "mlp2x_gelu", "vision_feature_layer": -2,
                                        "vision_feature_select": "patch"}
        assert "clip-vit-large-patch14-336" in s1.model.vision_path
        s2 = load_config(CONFIGS / f"llava15_{size}_finetune.yaml")
        assert (s2.train.stage, s2.optim.lr, s2.train.global_batch_size, s2.train.epochs) == ("finetune", 2e-5, 128, 1)
        assert (s2.data.image_mode, s2.data.template, s2.train.unfreeze_vision) == ("pad", "vicuna_v1", False)
        assert s2.model.projector_weights == f"{s1.train.output_dir}/projector.safetensors"
        assert size in s2.model.llm_path


def test_every_recipe_config_loads_and_the_first_llavas_recipes():
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        load_config(path)  # every key known, every value valid
    for size in ("7b", "13b"):
        s1 = load_config(CONFIGS / f"llava_{size}_pretrain.yaml")
        assert (s1.train.stage, s1.optim.lr, s1.train.global_batch_size, s1.train.epochs) == ("align", 2e-3, 128, 1)
        assert (s1.optim.warmup_ratio, s1.optim.schedule, s1.optim.weight_decay) == (0.03, "cosine", 0.0)
        assert (s1.data.model_max_length, s1.data.template) == (2048, "v0")
        assert s1.model.connector() == {"projector_type": "linear", "vision_feature_layer": -2,
                                        "vision_feature_select": "patch"}
        assert s1.model.vision_path.endswith("clip-vit-large-patch14")  # 224 px, not the 336-px tower
        assert s1.data.data_path.endswith("LLaVA-CC3M-Pretrain-595K/chat.json")
        s2 = load_config(CONFIGS / f"llava_{size}_finetune.yaml")
        assert (s2.train.stage, s2.optim.lr, s2.train.global_batch_size, s2.train.epochs) == ("finetune", 2e-5, 32, 3)
        assert (s2.optim.warmup_ratio, s2.optim.schedule, s2.optim.weight_decay) == (0.03, "cosine", 0.0)
        assert (s2.data.model_max_length, s2.data.template, s2.train.unfreeze_vision) == (2048, "v0", False)
        assert s2.model.connector() == s1.model.connector() and s2.model.vision_path == s1.model.vision_path
        assert s2.model.projector_weights == f"{s1.train.output_dir}/projector.safetensors"
        assert s2.data.data_path.endswith("llava_instruct_158k.json") and s2.data.image_folder.endswith("train2017")
        assert size in s2.model.llm_path and s2.model.llm_path == s1.model.llm_path


def test_lora_recipes_and_errors():
    for size in ("7b", "13b"):
        cfg = load_config(CONFIGS / f"llava15_{size}_lora.yaml")
        full = load_config(CONFIGS / f"llava15_{size}_finetune.yaml")
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (128, 256.0, 0.05)  # finetune_lora.sh
        assert (cfg.optim.lr, cfg.optim.projector_lr, cfg.train.global_batch_size, cfg.train.epochs) == (2e-4, 2e-5, 128, 1)
        assert cfg.model == full.model and cfg.data.data_path == full.data.data_path
        assert set(cfg.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for bad, message in [(["lora.rank=8", "train.stage=align"], "LoRA adapts the LLM in stage 2"),
                         (["lora.rank=-1"], "lora.rank must be >= 0"),
                         (["lora.targets=[q_proj,lm_head]"], "lora.targets: ['lm_head']"),
                         (["lora.dropout=1.0"], "lora.dropout must be in [0, 1)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, BASE + bad)


# train.main's @record enables faulthandler on stderr, which pytest's capture has no file descriptor for.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_help_with_a_config_shows_its_values(monkeypatch, capsys):
    config = CONFIGS / "llava15_7b_finetune.yaml"
    monkeypatch.setattr(sys, "argv", ["recipes/finetune.py", "--config", str(config), "optim.lr=1e-4", "--help"])
    runpy.run_path(str(CONFIGS.parent / "finetune.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"keys and their values ({config} and the command line over the defaults)" in out
    shown = yaml.safe_load(out.split("keys and their values", 1)[1].split("\n", 1)[1])
    runs = json.loads(json.dumps(load_config(config, ["optim.lr=1e-4"]).to_dict()))
    # A components run reads only the connector fields of model.architecture: the sizes come from the checkpoints.
    runs["model"]["architecture"] = runs["model"]["architecture"] and {
        k: runs["model"]["architecture"][k] for k in ("projector_type", "vision_feature_layer", "vision_feature_select")}
    assert shown == runs
    assert shown["optim"]["lr"] == 1e-4 and shown["model"]["llm_path"].endswith("vicuna-7b-v1.5")
