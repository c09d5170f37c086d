"""The demo's entry: it builds its own configuration, world and components, then runs the ordinary trainer;
what it cannot honour is an error that says how to train on one's own data."""

import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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
    # The demo's own values: DemoSettings' defaults are what runs, the YAML files do not restate them.
    assert finetune.demo == DemoSettings() and (finetune.demo.text_fraction, finetune.demo.tower_steps) == (0.2, 1500)
    assert finetune.demo.text.hidden_size == 128 and finetune.demo.vision.hidden_size == 64


def shown_values(text: str) -> dict:
    """The YAML that --help prints after its "keys and their values (...)" line."""
    return yaml.safe_load(text.split("keys and their values", 1)[1].split("\n", 1)[1])


# train.main's @record enables faulthandler on stderr, which pytest's capture has no file descriptor for.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
@pytest.mark.parametrize("recipe, stage", [("finetune", "finetune"), ("pretrain", "align")])
def test_help_shows_what_the_demo_will_run(recipe, stage, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"recipes/{recipe}.py", "--help", "optim.lr=0.25", "demo.samples=64"])
    runpy.run_path(str(ROOT / "recipes" / f"{recipe}.py"), run_name="__main__")
    shown = shown_values(capsys.readouterr().out)
    runs = load_config(CONFIGS[stage], ["optim.lr=0.25", "demo.samples=64", "model.vision_path=v", "model.llm_path=l"],
                       schema=DemoConfig).to_dict()
    runs = json.loads(json.dumps(runs))  # tuples as YAML shows them, lists
    for section in ("optim", "train", "parallel", "lora", "checkpoint", "logging"):
        assert shown[section] == runs[section], section
    assert shown["demo"] == {**runs["demo"], "text": {**runs["demo"]["text"], "vocab_size": shown["demo"]["text"]["vocab_size"]}}
    # The values a user asked about: the demo's, not the general defaults (0.1, 500, ViT-L, 7B, 2e-5, plain,
    # outputs/run).
    assert (shown["demo"]["text_fraction"], shown["demo"]["tower_steps"], shown["demo"]["samples"]) == (0.2, 1500, 64)
    assert shown["demo"]["vision"]["hidden_size"] == 64 and shown["demo"]["text"]["hidden_size"] == 128
    assert shown["optim"]["lr"] == 0.25 and shown["train"]["output_dir"] == f"outputs/demo-{recipe}"
    assert shown["data"]["template"] == ("vicuna_v1" if stage == "finetune" else "plain")
    assert shown["model"]["architecture"] == {"projector_type": "mlp2x_gelu", "vision_feature_layer": -1,
                                              "vision_feature_select": "patch"}  # no ViT-L / 7B sizes
    assert shown["model"]["llm_path"] == shown["data"]["data_path"] == "<made by the demo>"


@pytest.mark.parametrize("override", ["data.data_path=/nonexistent.json", "model.llm_path=/models/vicuna",
                                      "model.architecture.text.hidden_size=8"])
def test_overrides_the_demo_cannot_honour_are_errors(override):
    with pytest.raises(ValueError, match=r"(?s)runs the embedded demo.*--config recipes/configs/llava15_7b_finetune.yaml"):
        prepare([override], "finetune")


@pytest.mark.slow
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
    assert shown.returncode == 0 and "tower_steps: 1500" in shown.stdout and "max_tokens_per_pack" in shown.stdout


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_the_last_thing_shown():
    """torchrun ends a failed launch with its own traceback and a failure summary; the summary shows what the
    worker wrote to its error file, so the one-line message must be there (not a link to torch's docs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "recipes/finetune.py",
                          "train.max_steps=-1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode != 0
    last = [line.strip() for line in run.stderr.strip().splitlines()[-3:]]
    assert "traceback : error: train.max_steps must be > 0, got -1" in last, run.stderr[-2000:]


def test_demo_trains_through_the_ordinary_trainer_and_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    cfg, after = prepare(TINY + [f"train.output_dir={tmp_path / 'out'}"], "finetune")
    assert cfg.model.source == "components" and Path(cfg.model.vision_path, "config.json").is_file()
    assert Path(cfg.data.data_path).name == "train.json"
    result = train(cfg)
    scores = after(result)
    assert (result.export / "config.json").is_file()
    assert set(scores["per_type"]) == {"color", "count", "position", "shape", "text"}
    out = capsys.readouterr().out
    assert "overall" in out
    # The output ends with a chat command on the model it just trained, a held-out image and a held-out question
    # in the training wording; it runs as printed.
    command = shlex.split(out[out.index("python -m fastllava.chat"):])
    args = dict(zip(command[3::2], command[4::2]))
    first = next(s for s in json.loads(Path(cfg.data.data_path).with_name("eval.json").read_text()) if "image" in s)
    assert args["--model"] == str(result.export) and args["--temperature"] == "0"
    assert args["--image"] == str(Path(cfg.data.image_folder) / first["image"]) and "/eval/" in args["--image"]
    assert "<image>\n" + args["--prompt"] == first["conversations"][0]["value"]
    assert args["--prompt"].endswith("\nAnswer the question using a single word or phrase.")
    chat = subprocess.run([sys.executable] + command[1:], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    # Two training steps teach no answer (it may be empty): the command is checked to run, not to be right.
    assert chat.returncode == 0 and "error" not in chat.stderr, chat.stderr[-2000:]


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


def _offline_recipe(tmp_path, *launcher) -> subprocess.CompletedProcess:
    """The shipped 7B finetune recipe, whose models are Hub ids, run offline on an empty Hub cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    return subprocess.run([sys.executable, *launcher, "recipes/finetune.py", "--config",
                           "recipes/configs/llava15_7b_finetune.yaml", "train.device=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


# What hub.resolve says of an id that neither a path, the cache (offline) nor the Hub holds.
UNRESOLVED = ("error: model.llm_path lmsys/vicuna-7b-v1.5: no local path of that name, and lmsys/vicuna-7b-v1.5 "
              "is not in the Hub cache")


def test_a_model_that_cannot_be_found_is_a_config_error(tmp_path):
    run = _offline_recipe(tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith(UNRESOLVED) and "HF_HUB_OFFLINE is set" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]


@pytest.mark.slow
def test_under_torchrun_a_model_that_cannot_be_found_is_the_last_thing_shown(tmp_path):
    run = _offline_recipe(tmp_path, "-m", "torch.distributed.run", "--nproc_per_node=1")
    assert run.returncode != 0 and "[rank0]" not in run.stderr, run.stderr[-2000:]
    last = [line.strip() for line in run.stderr.strip().splitlines()[-3:]]
    assert any(line.startswith(f"traceback : {UNRESOLVED}") for line in last), run.stderr[-2000:]
