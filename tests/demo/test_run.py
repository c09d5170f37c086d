"""The demo's entry: it builds its own configuration, world and components, then runs the ordinary trainer;
what it cannot honour is an error that says how to train on one's own data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastllava.demo import components
from fastllava.demo.run import CONFIGS, DemoConfig, DemoSettings, prepare
from fastllava.demo.world import make_demo_dataset
from fastllava.config import load_config
from fastllava.model import TextConfig, VisionConfig
from fastllava.testing import TINY_TEXT, TINY_VISION
from fastllava.train import train
from fastllava.train.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[2]
TINY = ["demo.samples=48", "demo.eval_samples=6", "demo.tower_steps=2", "demo.tower_batch=8",
        "train.global_batch_size=8", "train.max_steps=2", "train.device=cpu", "data.num_workers=0",
        "logging.progress=false"]


def test_shipped_demo_configs_load():
    finetune = load_config(CONFIGS["finetune"], ["model.vision_path=v", "model.llm_path=l"], schema=DemoConfig)
    assert finetune.train.stage == "finetune" and finetune.data.template == "vicuna_v1"
    assert finetune.demo.vision.image_size == 112 and finetune.model.connector()["vision_feature_layer"] == -1
    pretrain = load_config(CONFIGS["align"], ["model.vision_path=v", "model.llm_path=l"], schema=DemoConfig)
    assert (pretrain.train.stage, pretrain.data.template, pretrain.data.image_mode) == ("align", "plain", "square")
    assert pretrain.demo == finetune.demo  # the same world and components


@pytest.mark.parametrize("override", ["data.data_path=/nonexistent.json", "model.llm_path=/models/vicuna",
                                      "model.architecture.text.hidden_size=8"])
def test_overrides_the_demo_cannot_honour_are_errors(override):
    with pytest.raises(ValueError, match=r"(?s)runs the embedded demo.*--config recipes/configs/llava15_7b_finetune.yaml"):
        prepare([override], "finetune")


def test_recipe_command_line_errors_and_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "recipes/finetune.py", "data.data_path=/nonexistent.json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: data.data_path" in bad.stderr and "--config" in bad.stderr, bad.stderr
    typo = subprocess.run([sys.executable, "recipes/pretrain.py", "optim.lrr=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "unknown key optim.lrr" in typo.stderr, typo.stderr
    shown = subprocess.run([sys.executable, "recipes/finetune.py", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "tower_steps" in shown.stdout and "max_tokens_per_pack" in shown.stdout


def test_demo_trains_through_the_ordinary_trainer_and_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    cfg, after = prepare(TINY + [f"train.output_dir={tmp_path / 'out'}"], "finetune")
    assert cfg.model.source == "components" and Path(cfg.model.vision_path, "config.json").is_file()
    assert Path(cfg.data.data_path).name == "train.json"
    result = train(cfg)
    scores = after(result)
    assert (result.export / "config.json").is_file()
    assert set(scores["per_type"]) == {"color", "count", "position", "shape", "text"}
    assert "overall" in capsys.readouterr().out


def test_components_are_made_once_per_setting(tmp_path, monkeypatch):
    world = make_demo_dataset(tmp_path / "world", n_train=24, n_eval=2)
    settings = DemoSettings(vision=VisionConfig(**TINY_VISION), text=TextConfig(**TINY_TEXT), tower_steps=2,
                            tower_batch=4)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    calls = []
    real = components.pretrain_vision_tower
    monkeypatch.setattr(components, "pretrain_vision_tower", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    kw = dict(vision_feature_layer=-1, image_mode="pad", env=env, show_progress=False)
    first = components.make_components(settings, world, **kw)
    again = components.make_components(settings, world, **kw)
    assert first == again and len(calls) == 1
    assert (first.llm_dir / "tokenizer.json").is_file() and (first.vision_dir / "model.safetensors").is_file()
    settings.tower_steps = 3
    other = components.make_components(settings, world, **kw)
    assert other != first and len(calls) == 2
    assert not [p for p in world.root.iterdir() if p.name.startswith(".")]  # no temporary directory left
