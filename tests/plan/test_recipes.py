"""The recipes beyond Vicuna (SigLIP x Qwen2.5-7B, CLIP x Llama-3.1-8B): their YAML files load and validate as
run configurations with LLaVA-1.5's data and schedule, the plan models the same runs (pack size,
checkpointing), and the memory plan runs at their shapes, sizing the optimizer state as transformers sizes
the trainable part of the same model."""

from pathlib import Path

import pytest
import torch

from fastllava.config import load_config
from fastllava.plan import RECIPES, recipe_config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
# recipe name -> (YAML prefix, tower directory, LLM directory, stage-2 template)
NEW = {"llava-1.5-qwen2.5-7b-siglip": ("llava15_qwen2.5_7b_siglip", "siglip-so400m-patch14-384",
                                       "Qwen2.5-7B-Instruct", "qwen"),
       "llava-1.5-llama3.1-8b": ("llava15_llama3.1_8b", "clip-vit-large-patch14-336", "Llama-3.1-8B-Instruct",
                                 "llama3")}


@pytest.fixture(autouse=True)
def no_process_group():
    """The memory plan makes its own fake process group; one left by an earlier test would be in the way."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", list(NEW))
def test_recipe_files_are_llava15_with_other_backbones(recipe):
    prefix, tower, llm, template = NEW[recipe]
    for stage, file in (("align", "pretrain"), ("finetune", "finetune")):
        ours = load_config(CONFIGS / f"{prefix}_{file}.yaml")  # every key known, every value valid
        paper = load_config(CONFIGS / f"llava15_7b_{file}.yaml")
        # LLaVA-1.5's data, schedule, batch, length and image handling, stage by stage
        for section in ("optim", "checkpoint"):
            assert getattr(ours, section) == getattr(paper, section), section
        assert ours.data.data_path == paper.data.data_path and ours.data.image_folder == paper.data.image_folder
        assert (ours.data.model_max_length, ours.data.image_mode) == (paper.data.model_max_length, paper.data.image_mode)
        assert (ours.train.stage, ours.train.global_batch_size, ours.train.epochs) == (
            stage, paper.train.global_batch_size, paper.train.epochs)
        assert ours.data.template == ("plain" if stage == "align" else template)
        assert ours.model.connector() == paper.model.connector()  # mlp2x_gelu on layer -2's patch tokens
        assert ours.model.vision_path.endswith(tower) and ours.model.llm_path.endswith(llm)
        # what the plan audits and projects is what the file runs
        assert ours.data.max_tokens_per_pack == RECIPES[recipe].pack[stage]
        assert ours.parallel.activation_checkpointing == "none"
        if stage == "align":
            projector = f"{ours.train.output_dir}/projector.safetensors"
        else:
            assert ours.model.projector_weights == projector and ours.train.output_dir != projector


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(NEW))
def test_memory_plan_runs_at_the_recipes_shape(recipe):
    """One candidate of stage 2 through the whole plan (depths 4 and 8, extrapolated); the optimizer state per
    rank is AdamW's two fp32 moments of the trainable parameters as transformers' Llava of the same config
    counts them (projector + LLM: the q/k/v biases, the untied head), sharded over the 8 ranks."""
    from fastllava.memplan import GiB, memory_plan
    from fastllava.reference import build_reference

    config = recipe_config(recipe)
    report, chosen = memory_plan(config, world=8, memory_gib=80, stages=["finetune"], pack_tokens=[2048],
                                 checkpointing=["full"])
    best = chosen["finetune"]
    assert best is not None and (best.max_tokens, best.checkpointing) == (2048, "full")
    assert "fastest that fits 80 GiB with a 10% margin: data.max_tokens_per_pack=2048" in report
    with torch.device("meta"):
        hf = build_reference(config, "finetune", checkpointing=False)
    trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert best.breakdown["optim"] == pytest.approx(2 * 4 * trainable / 8, rel=1e-6)
    assert 0 < best.peak < 80 * GiB
