"""Sharded loading (2 gloo processes): a model built on the meta device, sharded by FSDP2, then filled
with each rank's rows read from the safetensors files equals, shard for shard, the whole model loaded
then sharded, for a llava-hf directory (+ a stage-1 projector file replacing its projector), CLIP + LLaMA
directories with a new seeded projector (also stage 1 with the frozen LLM replicated: plain
parameters), and the original-LLaVA layout with a separate CLIP directory; the vocabulary grows for the
tokenizer's added tokens (mean rows) and position embeddings of 5 rows shard unevenly. Training steps
give the same losses both ways, and broken checkpoints raise the full loader's errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

VOCAB = 320  # ToyDataset's 300 + tokenizer additions (310), padded to a multiple of 64


def layouts(root: Path) -> dict[str, list[str]]:
    """name -> config overrides of each checkpoint the worker loads (written by `write_checkpoints`)."""
    pretrained = ["model.source=pretrained", "model.architecture=null"]
    if root.name == "broken":
        return {name: [*pretrained, f"model.pretrained_path={root / name}"] for name in BROKEN}
    components = ["model.source=components", "model.architecture=null", f"model.vision_path={root / 'clip'}",
                  f"model.llm_path={root / 'llama'}", "model.init_seed=3"]
    return {
        "hf": [*pretrained, f"model.pretrained_path={root / 'hf'}",
               f"model.projector_weights={root / 'projector.safetensors'}"],
        "components": components,
        "components_align": [*components, "train.stage=align", "parallel.frozen_llm=replicate", "optim.lr=0.05"],
        "original": [*pretrained, f"model.pretrained_path={root / 'orig'}"],
        # HSDP's 2D mesh (2 replicas x 1 shard): placements (Replicate(), Shard(0)), every rank whole.
        "hf_hsdp": [*pretrained, f"model.pretrained_path={root / 'hf'}", "parallel.replicate=2"],
    }


def _architecture():
    from train_tiny import ARCHITECTURE

    return replace(ARCHITECTURE, vision_feature_layer=-2)  # the last vision layer is carried, never run


def _original_layout(hf_dir: Path, clip_dir: Path, orig: Path, config) -> None:
    """The llava-hf checkpoint renamed to LLaVA's own LlavaLlamaForCausalLM layout, CLIP kept apart."""
    state = {}
    for key, t in load_file(hf_dir / "model.safetensors").items():
        if key.startswith("language_model.model."):
            state["model." + key[len("language_model.model."):]] = t
        elif key == "language_model.lm_head.weight":
            state["lm_head.weight"] = t
        elif key.startswith("multi_modal_projector.linear_"):
            n, leaf = key[len("multi_modal_projector.linear_"):].split(".")
            state[f"model.mm_projector.{2 * (int(n) - 1)}.{leaf}"] = t
    orig.mkdir(parents=True)
    save_file(state, orig / "model.safetensors")
    raw = {**config.text.to_hf(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
           "mm_vision_tower": str(clip_dir), "mm_projector_type": config.projector_type,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "mm_hidden_size": config.vision.hidden_size}
    (orig / "config.json").write_text(json.dumps(raw))


def _rewrite(path: Path, fn) -> None:
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


BROKEN = {
    "missing": lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"),
    "unexpected": lambda s: s.update({"something_else.weight": torch.zeros(2)}),
    "shape": lambda s: s.update({"multi_modal_projector.linear_1.weight": torch.zeros(64, 33)}),
}


def write_checkpoints(root: Path) -> None:
    from fastllava.testing import tiny_model

    model = tiny_model(_architecture(), seed=0)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt / "hf", max_shard_bytes=100_000)  # several shards + index
    model.save_components(ckpt / "clip", ckpt / "llama")
    tiny_model(_architecture(), seed=1).save_projector(ckpt / "projector.safetensors")
    model.save_pretrained(root / "single")
    _original_layout(root / "single", ckpt / "clip", ckpt / "orig", model.config)
    for name, fn in BROKEN.items():
        model.save_pretrained(root / "broken" / name)
        _rewrite(root / "broken" / name, fn)


@pytest.mark.slow
def test_every_rank_shard_equals_the_full_load_and_trains_the_same(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert set(r["layouts"]) == {"hf", "components", "components_align", "original", "hf_hsdp"}
        for name, res in r["layouts"].items():
            assert res["differ"] == [], (r["rank"], name)
            assert (res["sharded_params"] > 0) == (name != "hf_hsdp"), name  # really sharded over 2 ranks
            assert res["vocab"] == VOCAB
            # Same shards, same computation: the losses are the same numbers.
            full, sharded = res["losses"]["full"], res["losses"]["sharded"]
            assert sorted(full) == [1, 2] and full == sharded, (name, full, sharded)
            if r["rank"] == 0:  # the tensors the forward never uses: kept by the rank that exports
                assert res["carried"] == res["full_carried"] and res["carried"] and res["carried_equal"], name
            else:
                assert res["carried"] == [], name
        # The export's full state dict gathers to rank 0 only: the other ranks hold none of it.
        assert r["export_state_keys"] == (r["rank"] == 0), r["rank"]


@pytest.mark.slow
def test_broken_checkpoints_raise_the_full_loaders_errors(two_ranks):
    from fastllava.config import load_config
    from fastllava.data.tokenize import TokenizerIds
    from fastllava.train.build import build_model

    out, ranks = two_ranks
    ids = TokenizerIds(image_token_id=299, pad_token_id=0, vocab_size=310)
    for name, overrides in layouts(out / "broken").items():
        cfg = load_config(None, ["train.device=cpu", *overrides])
        with pytest.raises(ValueError) as full:
            build_model(cfg, ids, meta=False)
        for r in ranks:
            assert r["errors"][name] == str(full.value), (r["rank"], name)
    assert "missing tensors language_model.model.layers.1.mlp.up_proj.weight" in ranks[0]["errors"]["missing"]
    assert "unexpected key 'something_else.weight'" in ranks[0]["errors"]["unexpected"]
    assert "(64, 33) but the model expects (64, 32)" in ranks[0]["errors"]["shape"]


def test_meta_build_keeps_config_errors_early(tmp_path):
    """Errors that need no tensor (no config.json, unknown architecture) raise at build time, as before."""
    from fastllava.config import load_config
    from fastllava.data.tokenize import TokenizerIds
    from fastllava.train.build import build_model

    ids = TokenizerIds(image_token_id=299, pad_token_id=0, vocab_size=310)
    cfg = load_config(None, ["model.source=pretrained", f"model.pretrained_path={tmp_path}"])
    with pytest.raises(ValueError, match="no config.json"):
        build_model(cfg, ids, meta=True)
