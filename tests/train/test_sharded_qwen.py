"""Sharded loading of a SigLIP tower with a Qwen2 decoder (2 gloo processes), as test_sharded_load.py checks CLIP
with LLaMA: built on the meta device, sharded by FSDP2 and filled with each rank's rows, every parameter equals
the whole model loaded then sharded, bit for bit, and 2 training steps give the same losses both ways.

The checkpoints are written by transformers (random q/k/v biases and norms) for tied and untied embeddings: a
tied one stores no lm_head.weight, its head is the embedding (grown for the tokenizer's added tokens once, not
twice), and the tie must survive the meta build and materialization. The worker is dist_worker.py's `sharded`
mode with this module's `layouts`."""

from dataclasses import replace
from pathlib import Path

import pytest

VOCAB = 320  # ToyDataset's 300 + tokenizer additions (310), padded to a multiple of 64
SIGLIP = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
QWEN2 = {"model_type": "qwen2", "qkv_bias": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "bos_token_id": None}


def layouts(root: Path) -> dict[str, list[str]]:
    """name -> config overrides of each checkpoint the worker loads (written by `write_checkpoints`)."""
    if root.name == "broken":  # test_sharded_load.py checks the errors; the loader is the same
        return {}
    pretrained = ["model.source=pretrained", "model.architecture=null"]
    out = {}
    for tie in ("tied", "untied"):
        out[f"hf_{tie}"] = [*pretrained, f"model.pretrained_path={root / ('hf_' + tie)}"]
        out[f"components_{tie}"] = ["model.source=components", "model.architecture=null",
                                    f"model.vision_path={root / 'siglip'}", f"model.llm_path={root / ('qwen2_' + tie)}",
                                    "model.init_seed=3"]
    return out


def _architecture(tie: bool):
    from train_tiny import ARCHITECTURE

    # vision_feature_layer -2: the last SigLIP layer, post_layernorm and the pooling head are carried, not run.
    return replace(ARCHITECTURE, vision=replace(ARCHITECTURE.vision, **SIGLIP),
                   text=replace(ARCHITECTURE.text, **QWEN2, tie_word_embeddings=tie), vision_feature_layer=-2)


def write_checkpoints(root: Path) -> None:
    from fastllava import Llava
    from fastllava.testing import tiny_hf_llava

    for tie in (True, False):
        name = "tied" if tie else "untied"
        tiny_hf_llava(_architecture(tie), seed=int(tie)).save_pretrained(root / "ckpt" / f"hf_{name}",
                                                                         max_shard_bytes=100_000)
        Llava.from_pretrained(root / "ckpt" / f"hf_{name}").save_components(root / "ckpt" / "siglip",
                                                                             root / "ckpt" / f"qwen2_{name}")


def test_checkpoints_are_what_the_test_needs(tmp_path):
    """The written checkpoints hold what a missed bias or tie would need to show: random q/k/v biases, no
    lm_head.weight in the tied decoder directory, the SigLIP pooling head."""
    from safetensors.torch import load_file

    write_checkpoints(tmp_path)
    tied = load_file(tmp_path / "ckpt" / "qwen2_tied" / "model.safetensors")
    untied = load_file(tmp_path / "ckpt" / "qwen2_untied" / "model.safetensors")
    assert "lm_head.weight" not in tied and "lm_head.weight" in untied
    assert tied["model.layers.0.self_attn.k_proj.bias"].abs().min() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in tied
    assert "vision_model.head.probe" in load_file(tmp_path / "ckpt" / "siglip" / "model.safetensors")


@pytest.mark.slow
def test_every_rank_shard_equals_the_full_load_and_trains_the_same(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert set(r["layouts"]) == {"hf_tied", "hf_untied", "components_tied", "components_untied"}
        for name, res in r["layouts"].items():
            assert res["differ"] == [], (r["rank"], name)
            assert res["sharded_params"] > 0, name  # really sharded over 2 ranks
            assert res["vocab"] == VOCAB
            assert res["tied"] == name.endswith("_tied"), name
            full, sharded = res["losses"]["full"], res["losses"]["sharded"]
            assert sorted(full) == [1, 2] and full == sharded, (name, full, sharded)
            if r["rank"] == 0:  # the last SigLIP layer, post_layernorm and the head: kept by the exporting rank
                assert res["carried"] == res["full_carried"] and res["carried_equal"], name
                assert any(k.startswith("vision_tower.vision_model.head.") for k in res["carried"]), name
            else:
                assert res["carried"] == [], name
        assert not r["errors"]
