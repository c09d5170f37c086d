"""The wall-clock planner: FLOP counts against the real module's parameter count, and its inputs."""

import json

import pytest
import torch

from fastllava import Llava
from fastllava.plan import STAGES, measured_mfu, plan, recipe_config
from fastllava.flops import FlopModel


# Published parameter counts of LLaMA-2 7B / 13B (vocabulary 32,000), as the model cards give them; the
# recipes' Vicuna-1.5 with the <image> and pad tokens has 64 more rows in the embedding and in the head.
PUBLISHED = {"llava-1.5-7b": (6_738_415_616, 4096), "llava-1.5-13b": (13_015_864_320, 5120)}


@pytest.mark.parametrize("recipe", ["llava-1.5-7b", "llava-1.5-13b"])
def test_llm_flops_per_token_follow_the_parameter_count(recipe):
    config = recipe_config(recipe)
    with torch.device("meta"):
        model = Llava(config)
    published, width = PUBLISHED[recipe]
    everything = sum(p.numel() for p in model.language_model.parameters()) + model.lm_head.weight.numel()
    assert everything == published + 2 * 64 * width
    # matmul weights only: the embedding is a lookup and norm scales are elementwise
    llm = sum(p.numel() for n, p in model.language_model.named_parameters() if p.dim() == 2 and "embed" not in n)
    llm += model.lm_head.weight.numel()
    assert FlopModel.build(config, "finetune").llm_per_token == 6 * llm
    assert FlopModel.build(config, "align").llm_per_token == 4 * llm


def test_stage_hours_scale_inversely_with_gpus_and_mfu():
    eight = plan("llava-1.5-7b", 8, "A100-80G", {"align": 0.4, "finetune": 0.4})
    sixteen = plan("llava-1.5-7b", 16, "A100-80G", {"align": 0.8, "finetune": 0.4})
    assert [s.stage for s in eight] == [s for s, _ in STAGES]
    assert sixteen[0].hours == pytest.approx(eight[0].hours / 4)
    assert sixteen[1].hours == pytest.approx(eight[1].hours / 2)
    assert eight[1].samples == 665_298 and eight[0].samples == 558_128


def test_measured_file(tmp_path, capsys):
    good = tmp_path / "e2e.json"
    good.write_text(json.dumps({"stages": {"finetune": {"fastllava": {"mfu": 0.5}}}}))
    assert measured_mfu(good) == {"finetune": 0.5}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not an e2e.py result"):
        measured_mfu(bad)


def test_gpu_detection_by_device_name():
    """Names as torch.cuda.get_device_name() reports them; a near name is not taken for its neighbour."""
    from fastllava.hardware import match

    cases = {"NVIDIA H200": "H200", "NVIDIA H100 80GB HBM3": "H100-80G", "NVIDIA H100 PCIe": "H100-PCIe",
             "NVIDIA A100-SXM4-80GB": "A100-80G", "NVIDIA A100-SXM4-40GB": "A100-40G",
             "NVIDIA A100 80GB PCIe": "A100-80G-PCIe", "NVIDIA L40S": "L40S", "NVIDIA A10": "A10", "NVIDIA L4": "L4",
             "NVIDIA GeForce RTX 4090": "RTX-4090", "NVIDIA GeForce RTX 3090": "RTX-3090",
             "NVIDIA L40": None, "NVIDIA A10G": None, "NVIDIA GeForce RTX 3090 Ti": None, "Tesla V100-SXM2-16GB": None}
    assert {name: getattr(match(name), "name", None) for name in cases} == cases
