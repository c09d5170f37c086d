"""The out-of-memory message names the memory plan's recipe nearest the model being trained: its table of
recipes (train/faults.py, which may not import the plan) equals the plan's RECIPES, and every recipe's own
model is nearest to itself (a Qwen2.5-7B or Llama-3.1-8B run was sent to Vicuna-7B's plan before)."""

import pytest
import torch

from fastllava import plan
from fastllava.train.distributed import DistEnv
from fastllava.train.faults import PLAN_RECIPES, nearest_recipe, oom_message

from train_tiny import tiny_config


@pytest.mark.parametrize("name", sorted(plan.RECIPES))
def test_each_recipe_is_nearest_to_itself(name):
    text = plan.RECIPES[name].config().text
    assert PLAN_RECIPES[name] == (text.vocab_size, text.hidden_size)
    assert nearest_recipe(text.vocab_size, text.hidden_size) == name


def test_table_names_every_recipe():
    assert set(PLAN_RECIPES) == set(plan.RECIPES)


def test_message_names_the_nearest_recipe(tmp_path):
    cfg, env = tiny_config(tmp_path), DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    qwen = plan.RECIPES["llava-1.5-qwen2.5-7b-siglip"].config().text
    assert "--recipe llava-1.5-qwen2.5-7b-siglip " in oom_message(cfg, env, "a step", text=qwen)
    assert "--recipe llava-1.5-7b " in oom_message(cfg, env, "a step")  # no model: LLaVA-1.5-7B's, as before
    # Qwen2.5-0.5B (896 wide, 151,936 rows) and Mistral-7B (4096, 32,768): the nearest in both measures
    assert nearest_recipe(151936, 896) == "llava-1.5-qwen2.5-7b-siglip"
    assert nearest_recipe(32768, 4096) == "llava-1.5-7b"
