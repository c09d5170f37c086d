"""Every shipped recipe names its models as a user gets them: a published Hugging Face Hub id, the stage-1
output of a pretrain recipe with the same tower and connector, or a local directory whose YAML file says why
no id exists; and planning a recipe reads no checkpoint, so it needs neither the Hub nor a download."""

import socket
from pathlib import Path

import pytest

from fastllava.config import load_config
from fastllava.model.hub import is_hub_id
from fastllava.plan import RECIPES, main

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
# The repositories the recipes name (checked by hand on huggingface.co, 2026-12-06).
PUBLISHED = {"openai/clip-vit-large-patch14-336", "openai/clip-vit-large-patch14", "google/siglip-so400m-patch14-384",
             "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5", "lmsys/vicuna-7b-v1.3", "Qwen/Qwen2.5-7B-Instruct",
             "meta-llama/Llama-3.1-8B-Instruct"}
# No Hub id: Vicuna v0 is published only as a delta on LLaMA, applied by hand.
LOCAL = {"checkpoints/vicuna-7b-v0", "checkpoints/vicuna-13b-v0"}


def text_of(path: Path) -> str:
    """The YAML file and those it is based on (`base: other.yaml`), as text."""
    text = path.read_text()
    base = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("base:")]
    return text + "".join(text_of(path.parent / b) for b in base)


def test_every_recipe_names_published_ids_or_says_why_not():
    configs = sorted(CONFIGS.glob("*.yaml"))
    stage1 = {f"{cfg.train.output_dir}/projector.safetensors": cfg
              for cfg in (load_config(p) for p in configs) if cfg.train.stage == "align"}
    for path in configs:
        cfg = load_config(path)
        for key in ("vision_path", "llm_path", "pretrained_path", "tokenizer_path"):
            value = getattr(cfg.model, key)
            if value is None:
                continue
            assert value in PUBLISHED | LOCAL, f"{path.name}: model.{key}={value} is not a published id"
            assert is_hub_id(value) and not Path(value).is_absolute()
            if value in LOCAL:
                assert "No Hub id" in text_of(path), f"{path.name}: model.{key}={value} without saying why"
        if cfg.model.projector_weights is not None:
            pretrain = stage1.get(cfg.model.projector_weights)
            assert pretrain is not None, f"{path.name}: {cfg.model.projector_weights} is no pretrain recipe's output"
            # A projector only fits the tower (its width, its feature layer) it was trained on; the AnyRes grid is no
            # part of it (LLaVA-NeXT's stage 1 is fixed-resolution, its stage 2 tiles at image_grid_pinpoints).
            def projector_fit(c):
                connector = {k: v for k, v in c.model.connector().items() if k != "image_grid_pinpoints"}
                return c.model.vision_path, connector
            assert projector_fit(pretrain) == projector_fit(cfg)


@pytest.mark.parametrize("recipe", [r if r == "llava-1.5-7b" else pytest.param(r, marks=pytest.mark.slow)
                                    for r in sorted(RECIPES)])
def test_plan_of_a_recipe_opens_no_connection(recipe, monkeypatch, capsys):
    attempts = []

    def refuse(sock, address, *args):  # recorded: huggingface_hub catches the error and tries its cache
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    main(["--recipe", recipe, "--gpus", "8"])
    assert "| total |" in capsys.readouterr().out
    assert attempts == []
