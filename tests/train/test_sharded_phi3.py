"""Sharded loading of a CLIP tower with a Phi-3 decoder (2 gloo processes), as test_sharded_load.py checks CLIP
with LLaMA: Phi-3's checkpoints stack q/k/v in qkv_proj and gate/up in gate_up_proj, which our decoder keeps as
separate parameters, so each rank reads its rows of each part out of the stacked tensor's rows (the parts'
row ranges and FSDP's dim-0 shards do not line up). Every parameter built on the meta device and filled that
way equals the whole model loaded then sharded, bit for bit, and 2 training steps give the same losses.

The checkpoints are written by transformers (random norms): a llava-hf directory in several shards and a
Phi3ForCausalLM component directory. The worker is dist_worker.py's `sharded` mode with this module's
`layouts`."""

from dataclasses import replace
from pathlib import Path

import pytest

# Phi-3-mini-4k's kind: a sliding window (here longer than ToyDataset's samples) and rms_norm_eps 1e-5.
PHI3 = {"model_type": "phi3", "sliding_window": 64, "rms_norm_eps": 1e-5}


def layouts(root: Path) -> dict[str, list[str]]:
    """name -> config overrides of each checkpoint the worker loads (written by `write_checkpoints`)."""
    if root.name == "broken":  # test_sharded_load.py checks the errors; the loader is the same
        return {}
    return {"hf": ["model.source=pretrained", "model.architecture=null", f"model.pretrained_path={root / 'hf'}"],
            "components": ["model.source=components", "model.architecture=null", f"model.vision_path={root / 'clip'}",
                           f"model.llm_path={root / 'phi3'}", "model.init_seed=3"]}


def write_checkpoints(root: Path) -> None:
    from train_tiny import ARCHITECTURE

    from fastllava import Llava
    from fastllava.testing import tiny_hf_llava

    architecture = replace(ARCHITECTURE, text=replace(ARCHITECTURE.text, **PHI3), vision_feature_layer=-2)
    tiny_hf_llava(architecture).save_pretrained(root / "ckpt" / "hf", max_shard_size=100_000)
    Llava.from_pretrained(root / "ckpt" / "hf").save_components(root / "ckpt" / "clip", root / "ckpt" / "phi3")


def test_checkpoints_store_stacked_tensors(tmp_path):
    from safetensors.torch import load_file

    write_checkpoints(tmp_path)
    phi3 = load_file(tmp_path / "ckpt" / "phi3" / "model.safetensors")
    # 64 query rows + 32 key + 32 value rows (2 KV heads of 16): rank 1's half of k_proj is rows 80..96 here.
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"].shape == (128, 64)
    assert phi3["model.layers.1.mlp.gate_up_proj.weight"].shape == (256, 64)
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in phi3)


@pytest.mark.slow
def test_every_rank_shard_equals_the_full_load_and_trains_the_same(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert set(r["layouts"]) == {"hf", "components"}
        for name, res in r["layouts"].items():
            assert res["differ"] == [], (r["rank"], name)
            assert res["sharded_params"] > 0, name  # really sharded over 2 ranks
            full, sharded = res["losses"]["full"], res["losses"]["sharded"]
            assert sorted(full) == [1, 2] and full == sharded, (name, full, sharded)
        assert not r["errors"]
