"""An original-LLaVA directory (model.source=pretrained, config.json with mm_vision_tower) whose tower cannot be
found is a configuration error before anything is built, as every other model reference is
(train/build.py resolve_references): a missing path, or a Hub id that the cache does not hold offline, is
one `error:` line and exit status 2 from the recipe's main() (it was a traceback at model load). A checkpoint
that holds its own tower needs none (LLaVA-NeXT's original checkpoints train the tower and name it by id)."""

import json

import pytest
import torch
import yaml
from huggingface_hub import constants
from safetensors.torch import save_file

from fastllava.config import load_config
from fastllava.train.build import resolve_references

CLIP_ID = "openai/clip-vit-large-patch14-336"  # never downloaded, nor in the test's empty cache


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def original_llava(path, tower: str, *, with_tower: bool = False):
    """An original-LLaVA directory as resolve_references reads it: LlavaLlamaForCausalLM's config.json naming
    `tower`, and a checkpoint whose tensor names are LLaVA's (holding the tower's own when `with_tower`)."""
    path.mkdir()
    names = ["model.embed_tokens.weight", "model.mm_projector.0.weight", "lm_head.weight"]
    names += ["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] if with_tower else []
    save_file({name: torch.zeros(2, 2) for name in names}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": tower,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "hidden_size": 64, "vocab_size": 128}))
    return path


def pretrained(path):
    return load_config(None, ["train.device=cpu", "model.source=pretrained", f"model.pretrained_path={path}"])


def test_a_missing_tower_path_is_named(tmp_path):
    orig = original_llava(tmp_path / "orig", str(tmp_path / "gone"))
    with pytest.raises(ValueError) as err:
        resolve_references(pretrained(orig))
    assert str(err.value) == (
        f"{orig}: the checkpoint holds no vision tower and mm_vision_tower '{tmp_path / 'gone'}' is not a local "
        f"directory; set mm_vision_tower in {orig}/config.json to a local CLIP directory")


def test_a_tower_id_not_in_the_cache_offline_is_named(tmp_path):
    orig = original_llava(tmp_path / "orig", CLIP_ID)
    with pytest.raises(ValueError, match=f"{orig}/config.json mm_vision_tower {CLIP_ID}: .*not in the Hub cache.*"
                                         "HF_HUB_OFFLINE is set.*; or set mm_vision_tower in "
                                         f"{orig}/config.json to a local CLIP directory$"):
        resolve_references(pretrained(orig))


def test_a_tower_that_is_there_or_not_needed_passes(tmp_path):
    (tmp_path / "clip").mkdir()
    resolve_references(pretrained(original_llava(tmp_path / "local", str(tmp_path / "clip"))))
    resolve_references(pretrained(original_llava(tmp_path / "bundled", CLIP_ID, with_tower=True)))


# train.main's @record enables faulthandler on stderr, which pytest's capture has no file descriptor for.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_the_recipe_stops_with_one_line(tmp_path, capsys):
    from fastllava.train import main

    orig = original_llava(tmp_path / "orig", CLIP_ID)
    data = tmp_path / "data.json"
    data.write_text("[]")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "pretrained", "pretrained_path": str(orig)},
        "data": {"data_path": str(data), "template": "vicuna_v1", "num_workers": 0},
        "train": {"stage": "finetune", "device": "cpu", "output_dir": str(tmp_path / "out")},
        "logging": {"progress": False}}))
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(config)], "finetune")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {orig}/config.json mm_vision_tower {CLIP_ID}: "), err
    assert not (tmp_path / "out").exists()
