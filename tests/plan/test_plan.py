"""The wall-clock planner: FLOP counts against the real module's parameter count, and its inputs."""

import json

import pytest
import torch

from fastllava import Llava
from fastllava.plan import STAGES, measured_mfu, plan, recipe_config
from fastllava.flops import FlopModel


# Published parameter counts of the decoders, as their model cards and safetensors indexes give them, and
# the rows train/build.py adds to the embedding and to the head: Vicuna-1.5 (LLaMA-2, vocabulary 32,000)
# gains <image> and is padded to 32,064; Qwen2.5's 152,064 rows already hold <image> (151,665 tokens in
# its tokenizer); Llama-3.1's 128,256 gain <image> and <pad>, padded to 128,320.
PUBLISHED = {"llava-1.5-7b": (6_738_415_616, 4096, 64), "llava-1.5-13b": (13_015_864_320, 5120, 64),
             "llava-1.5-qwen2.5-7b-siglip": (7_615_616_512, 3584, 0), "llava-1.5-llama3.1-8b": (8_030_261_248, 4096, 64)}


@pytest.mark.parametrize("recipe", list(PUBLISHED))
def test_llm_flops_per_token_follow_the_parameter_count(recipe):
    config = recipe_config(recipe)
    with torch.device("meta"):
        model = Llava(config)
    published, width, added = PUBLISHED[recipe]
    everything = sum(p.numel() for p in model.language_model.parameters()) + model.lm_head.weight.numel()
    assert everything == published + 2 * added * width
    # matmul weights only: the embedding is a lookup and norm scales are elementwise
    llm = sum(p.numel() for n, p in model.language_model.named_parameters() if p.dim() == 2 and "embed" not in n)
    llm += model.lm_head.weight.numel()
    assert FlopModel.build(config, "finetune").llm_per_token == 6 * llm
    assert FlopModel.build(config, "align").llm_per_token == 4 * llm


@pytest.mark.parametrize("recipe, model_type, image_tokens", [
    ("llava-1.5-7b", "clip_vision_model", 576), ("llava-1.5-llama3.1-8b", "clip_vision_model", 576),
    ("llava-1.5-qwen2.5-7b-siglip", "siglip_vision_model", 729)])
def test_recipe_towers_and_their_tokens(recipe, model_type, image_tokens):
    """Each image fills the tower's patch count: 24 x 24 for CLIP at 336 px (its CLS dropped), 27 x 27 for
    siglip-so400m-patch14-384 (no CLS to drop); the stage's samples grow by those tokens per image."""
    config = recipe_config(recipe)
    assert (config.vision.model_type, config.num_image_tokens) == (model_type, image_tokens)
    align, finetune = plan(recipe, 8, "A100-80G", {"align": 0.4, "finetune": 0.4})
    clip = {s.stage: s for s in plan("llava-1.5-7b", 8, "A100-80G", {"align": 0.4, "finetune": 0.4})}
    images = {"align": 558_128, "finetune": 624_610}  # image samples of the two profiles, one image each
    for s in (align, finetune):
        assert s.tokens - clip[s.stage].tokens == pytest.approx((image_tokens - 576) * images[s.stage], rel=0.01)


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
