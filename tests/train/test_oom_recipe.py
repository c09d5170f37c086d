"""The out-of-memory message names the memory plan's recipe nearest the model being trained: its table of
recipes (train/faults.py, which may not import the plan) equals the plan's RECIPES, and every recipe's own
model is nearest to itself (a Qwen2.5-7B or Llama-3.1-8B run was sent to Vicuna-7B's plan before); an AnyRes
run of LLaVA-NeXT-7B's decoder gets the plan's llava-next-7b (it got llava-1.5-7b's fixed-resolution plan
before), with the run's own pack size and checkpointing mode, through the trainer as through oom_message."""

import dataclasses
import re

import pytest
import torch

from fastllava import plan
from fastllava.train.distributed import DistEnv
from fastllava.train import Trainer
from fastllava.train.faults import ANYRES_PLAN_RECIPES, PLAN_RECIPES, nearest_recipe, oom_message

from test_anyres_train import CONFIG as ANYRES_TINY
from test_anyres_train import ANYRES, AnyResToy
from fastllava.testing import tiny_model
from train_tiny import ARCHITECTURE, ToyDataset, tiny_config

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(plan.RECIPES))
def test_each_recipe_is_nearest_to_itself(name):
    text = plan.RECIPES[name].config().text
    assert PLAN_RECIPES[name] == (text.vocab_size, text.hidden_size)
    assert nearest_recipe(text.vocab_size, text.hidden_size) == name


def test_table_names_every_recipe():
    assert set(PLAN_RECIPES) == set(plan.RECIPES)
    assert set(ANYRES_PLAN_RECIPES) == set(plan.ANYRES_RECIPES)


@pytest.mark.parametrize("name", sorted(plan.ANYRES_RECIPES))
def test_anyres_recipe_is_nearest_to_itself(name):
    config = plan.ANYRES_RECIPES[name].config("finetune")
    assert config.image_grid_pinpoints is not None
    assert ANYRES_PLAN_RECIPES[name] == (config.text.vocab_size, config.text.hidden_size)
    assert nearest_recipe(config.text.vocab_size, config.text.hidden_size, anyres=True) == name


def test_message_names_the_nearest_recipe(tmp_path):
    cfg, env = tiny_config(tmp_path), CPU
    qwen = plan.RECIPES["llava-1.5-qwen2.5-7b-siglip"].config()
    assert "--recipe llava-1.5-qwen2.5-7b-siglip " in oom_message(cfg, env, "a step", config=qwen)
    assert "--recipe llava-1.5-7b " in oom_message(cfg, env, "a step")  # no model: LLaVA-1.5-7B's, as before
    # Qwen2.5-0.5B (896 wide, 151,936 rows) and Mistral-7B (4096, 32,768): the nearest in both measures
    assert nearest_recipe(151936, 896) == "llava-1.5-qwen2.5-7b-siglip"
    assert nearest_recipe(32768, 4096) == "llava-1.5-7b"


def plan_args(message, monkeypatch):
    """The arguments fastllava.plan parses from the command at the end of an out-of-memory message."""
    command = message.split("fits: ")[1].replace("<GPU>", "H100-80G").split()
    parsed = []
    monkeypatch.setattr(plan, "_memory", lambda parser, args: parsed.append(args))
    plan.main(command[3:])
    return parsed[0]


def test_anyres_message_names_the_anyres_recipe_with_the_runs_values(tmp_path, monkeypatch):
    """LLaVA-NeXT-7B's AnyRes architecture gets llava-next-7b; its decoder at fixed resolution llava-1.5-7b;
    an AnyRes Qwen2.5 decoder, which no AnyRes recipe has, its fixed-resolution recipe. The pack sizes and the
    checkpointing mode are the run's (4096 and selective), not the recipe's (8192 and none)."""
    cfg = tiny_config(tmp_path, "data.max_tokens_per_pack=4096", "data.model_max_length=1024",
                      "parallel.activation_checkpointing=selective")
    next_7b = plan.ANYRES_RECIPES["llava-next-7b"].config("finetune")
    message = oom_message(cfg, CPU, "a step", config=next_7b)
    assert "data.max_tokens_per_pack=4096, parallel.activation_checkpointing=selective" in message
    assert "Try data.max_tokens_per_pack=2048 or parallel.activation_checkpointing=full" in message
    args = plan_args(message, monkeypatch)
    assert args.recipe == "llava-next-7b" and args.pack_tokens == [2048, 4096] and args.stages == ["finetune"]
    fixed = dataclasses.replace(next_7b, image_grid_pinpoints=None)
    assert "--recipe llava-1.5-7b " in oom_message(cfg, CPU, "a step", config=fixed)
    qwen = plan.RECIPES["llava-1.5-qwen2.5-7b-siglip"].config()
    qwen_anyres = dataclasses.replace(qwen, image_grid_pinpoints=next_7b.image_grid_pinpoints)
    assert "--recipe llava-1.5-qwen2.5-7b-siglip " in oom_message(cfg, CPU, "a step", config=qwen_anyres)


@pytest.mark.parametrize("anyres", [False, True])
def test_trainer_passes_the_models_grid(tmp_path, monkeypatch, anyres):
    """The trainer's out-of-memory message reads the model's own config: a tiny AnyRes model (whose decoder is
    nearest Vicuna-7B's) is sent to llava-next-7b, the same decoder at fixed resolution to llava-1.5-7b."""
    assert ANYRES_TINY.text == ARCHITECTURE.text
    cfg = tiny_config(tmp_path, *ANYRES, "train.max_steps=1", *(["data.image_mode=anyres"] if anyres else []))
    model, data = (tiny_model(ANYRES_TINY), AnyResToy(8)) if anyres else (tiny_model(ARCHITECTURE), ToyDataset(8))
    trainer = Trainer(cfg, model, data)

    def forward(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(torch.OutOfMemoryError) as err:
        trainer.run()
    assert re.search(r"data.max_tokens_per_pack=96, parallel.activation_checkpointing=none", str(err.value))
    assert plan_args(str(err.value), monkeypatch).recipe == ("llava-next-7b" if anyres else "llava-1.5-7b")
