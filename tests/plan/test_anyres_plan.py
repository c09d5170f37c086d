"""The plan at AnyRes (LLaVA-NeXT): the FLOP audit of a tiny AnyRes model with its tower trained executes exactly
FlopModel's useful FLOPs for the pack's tiles, and the reference's padding lines are the hand counts of its padded
batches of 4; the reference's padding of a hand-made batch of image sizes at llava-v1.6's grid, computed by hand;
the memory plan at AnyRes on fake tensors, with the tower's gradients and AdamW state when it trains."""

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from fastllava import Llava
from fastllava.data.profile import IMAGE_SIZES, STAGE_PROFILES, sample_profile
from fastllava.flop_audit import audit_flops
from fastllava.flops import FlopModel
from fastllava.memplan import estimate_memory, fake_process_group, full_pack
from fastllava.plan import main, recipe_config
from fastllava.reference import build_reference, make_sample, make_samples, pad_batch, reference_loss, step_batches
from fastllava.testing import TORCH_BACKENDS, tiny_config

TILE = 56
# llava-v1.6's grid scaled by 1/6: the profile's 640 x 480 photos land on 2x2, book covers on 1x2, and so on
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def next_config(layers=4):
    return tiny_config(vision={"image_size": TILE}, text={"max_position_embeddings": 8192, "num_hidden_layers": layers},
                       image_grid_pinpoints=PINPOINTS)


@pytest.fixture(autouse=True)
def no_process_group():
    """The memory plan makes its own fake process group; one left by an earlier test would be in the way."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_profile_draws_sizes_without_changing_the_text():
    """AnyRes adds each image's own token count to the same text lengths; sizes come from IMAGE_SIZES."""
    cfg = next_config()
    fixed = sample_profile("mix665k", n=2000, num_image_tokens=0, model_max_length=None)
    drawn = sample_profile("mix665k", n=2000, num_image_tokens=cfg.num_image_tokens, model_max_length=None,
                           anyres=cfg.anyres)
    image = drawn["has_image"]
    assert np.array_equal(drawn["lengths"] - drawn["image_tokens"], fixed["lengths"])
    sizes = {tuple(hw) for hw, _ in sum(IMAGE_SIZES.values(), ())}
    assert {tuple(hw) for hw in drawn["image_size"][image].tolist()} <= sizes
    tiles = [image_size_to_num_patches(list(hw), PINPOINTS, TILE) for hw in drawn["image_size"][image].tolist()]
    assert drawn["tiles"][image].tolist() == tiles and not drawn["tiles"][~image].any()
    assert len(set(drawn["image_tokens"][image].tolist())) >= 4  # token counts differ by image size


@pytest.mark.slow
def test_anyres_audit_executes_the_useful_flops_and_pads_as_counted_by_hand():
    """Tower trained, no checkpointing: FlopCounterMode over fastllava's AnyRes forward + backward of the step's packs
    equals FlopModel's FLOPs of its tokens and of every base image and tile; the reference's padding and logits lines
    are what its per-device batches of 4 (sorted by text, not by image tokens) add, counted here by hand."""
    cfg, stage, world, n = next_config(), "finetune", 2, 24
    audit = audit_flops(cfg, stage, world=world, max_tokens=8192, checkpointing="none", global_batch=n,
                        unfreeze_vision=True)
    assert audit.fastllava == pytest.approx(audit.useful, rel=1e-9)
    samples = make_samples(cfg, STAGE_PROFILES[stage], n, seed=0)  # what the audit drew (seed 0)
    tiles = sum(image_size_to_num_patches(list(hw), PINPOINTS, TILE) for s in samples for hw in s["image_sizes"])
    assert audit.images == tiles > sum(s["pixel_values"] is not None for s in samples)
    lengths = np.array([s["length"] for s in samples])
    useful = FlopModel.build(cfg, stage, unfreeze_vision=True).flops(int(lengths.sum()), int((lengths**2).sum()), tiles)
    assert audit.useful == pytest.approx(useful, rel=1e-12)
    lines = {k: v * audit.useful for k, v in audit.breakdown.items()}
    batches = step_batches(samples, world, batch_size=4)
    assert max(len(b) for b in batches) == 4
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    t = cfg.text
    head = 6 * t.vocab_size * t.hidden_size
    layers = FlopModel.build(cfg, stage).llm_per_token - head
    assert padded > lengths.sum()
    assert lines["padding"] == pytest.approx((padded - lengths.sum()) * layers, rel=1e-9)
    assert lines["logits"] == pytest.approx((padded - lengths.sum()) * head, rel=1e-9)
    v = cfg.vision  # the tower's last layer on every tile, its output unused
    s = v.num_patches + v.has_class_token
    last_layer = 2 * s * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * v.hidden_size * s * s
    assert lines["residual"] == pytest.approx(tiles * last_layer, rel=1e-9)
    assert lines["recompute"] > 0


def test_reference_pads_a_batch_of_image_sizes_as_counted_by_hand():
    """llava-v1.6's grid (CLIP-336: 24 x 24 features per tile), each count derived by hand:
    480 x 640 (h x w): 2x2 (672 x 672 keeps all its pixels), a 48 x 48 map whose 36 rows show the image:
      576 + 36 x (48 + 1) = 2340 tokens;
    640 x 640: 2x2, nothing cut: 576 + 48 x 49 = 2928;
    160 x 107: every grid keeps all its pixels, the least canvas is 336 x 672 (the first of the two), a 24 x 48 map
      whose 16 columns show the image: 576 + 24 x 17 = 984;
    333 x 500: 336 x 672 (1x2) keeps all its pixels with the least canvas, 36 columns of 48: 576 + 24 x 37 = 1464.
    A batch of those with 100, 40, 300 and 60 text tokens and one text-only sample of 500 pads to its longest."""
    cfg = recipe_config("llava-next-7b")
    assert recipe_config("llava-next-7b", "align").anyres is None  # stage 1 is LLaVA-1.5's
    g = torch.Generator().manual_seed(0)
    layout = [((480, 640), 100), ((640, 640), 40), ((160, 107), 300), ((333, 500), 60), (None, 500)]
    tokens = {(480, 640): 2340, (640, 640): 2928, (160, 107): 984, (333, 500): 1464, None: 0}
    samples = [make_sample(cfg, tokens[size] + text, size is not None, g, size) for size, text in layout]
    batch = pad_batch(cfg, samples)
    real = [2440, 2968, 1284, 1524, 500]
    assert batch.lengths == real and batch.input_ids.shape == (5, 2968)
    assert int(batch.attention_mask.sum()) == sum(real) and 5 * 2968 - sum(real) == 6124  # the padding
    assert batch.pixel_values.shape[0] == 5 + 5 + 3 + 3  # base image + 4 tiles, or + 2
    assert len(batch.feature_index) == 2340 + 2928 + 984 + 1464 == len(batch.image_positions[0])


@pytest.mark.parametrize("unfreeze", [False, True])
def test_memory_plan_runs_at_anyres_on_fake_tensors(unfreeze):
    """A full AnyRes pack (images of the profile's sizes, each its own tiles and tokens) through one steady-state
    step on fake tensors; a trained tower adds its sharded fp32 gradients and AdamW's two moments."""
    cfg = next_config(layers=2)
    pack = full_pack(cfg, "mix665k", 1024)
    assert pack.num_tokens == 1024 and pack.anyres == cfg.anyres and len(set(pack.image_token_counts)) > 1
    with fake_process_group(2):
        frozen, trained = (estimate_memory(cfg, "finetune", [1024], "none", world=2, backends=TORCH_BACKENDS,
                                           unfreeze_vision=u)[0] for u in (False, unfreeze))
    with torch.device("meta"):
        tower = sum(p.numel() for p in Llava(cfg, TORCH_BACKENDS).vision_tower.parameters())
    extra = trained.breakdown["optim"] - frozen.breakdown["optim"]
    assert extra == pytest.approx(unfreeze * 2 * 4 * tower / 2, rel=0.02)  # two fp32 moments, half per rank
    assert trained.breakdown["grads"] - frozen.breakdown["grads"] == pytest.approx(unfreeze * 4 * tower / 2, rel=0.02)


def test_cli_knows_the_anyres_recipe(capsys):
    main(["--recipe", "llava-next-7b", "--gpus", "8", "--gpu", "A100-80G"])
    out = capsys.readouterr().out
    assert "| finetune | 665,298 |" in out and "llava-next-7b" in out


def test_plan_models_what_the_recipe_files_run():
    """The plan's llava-next-7b is recipes/configs/llava_next_7b_*.yaml: pack size, checkpointing, the tower trained,
    the grid; stage 1 at fixed resolution."""
    from pathlib import Path

    from fastllava.config import load_config
    from fastllava.plan import ANYRES_RECIPES

    configs = Path(__file__).resolve().parents[2] / "recipes" / "configs"
    spec = ANYRES_RECIPES["llava-next-7b"]
    for stage, file in (("align", "pretrain"), ("finetune", "finetune")):
        path = configs / f"llava_next_7b_{file}.yaml"
        if not path.exists():
            pytest.skip(f"{path.name} not in this checkout")
        cfg = load_config(path)
        assert cfg.data.max_tokens_per_pack == spec.pack[stage]
        assert cfg.parallel.activation_checkpointing == spec.checkpointing_of(stage)
        assert cfg.train.unfreeze_vision == (stage in spec.unfreeze_vision)
        pinpoints = spec.config(stage).image_grid_pinpoints
        assert cfg.model.connector().get("image_grid_pinpoints") == pinpoints


def test_reference_step_is_transformers_llava_next():
    """The reference's AnyRes loss (its own tower call over every tile of the batch, the features written through
    the pack's feature_index) equals transformers' LlavaNext forward from pixel_values and image_sizes, float64,
    on a padded batch of images of five grids and a text-only sample."""
    cfg = next_config(layers=2)
    g = torch.Generator().manual_seed(0)
    layout = [((30, 130), 20), (None, 50), ((130, 30), 10), ((100, 90), 5), ((3, 200), 12)]
    samples = [make_sample(cfg, (cfg.anyres.num_tokens(s) if s else 0) + t, s is not None, g, s) for s, t in layout]
    batch = pad_batch(cfg, samples).to("cpu", torch.float64)
    model = build_reference(cfg, "finetune", checkpointing=False, attn_implementation="eager", dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():  # transformers' init leaves norms at 1 and biases at 0, which would hide mistakes in them
        for p in model.parameters():
            p.normal_(0, 0.2)
    sizes = [hw for s in samples for hw in s["image_sizes"]]
    tiles = [image_size_to_num_patches(list(hw), PINPOINTS, TILE) for hw in sizes]
    pixels = torch.zeros(len(sizes), max(tiles), 3, TILE, TILE, dtype=torch.float64)  # per image, padded
    for k, image in enumerate(torch.split(batch.pixel_values, tiles)):
        pixels[k, : len(image)] = image
    expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                     image_sizes=torch.tensor(sizes), labels=batch.labels, use_cache=False).loss
    assert reference_loss(model, cfg, batch).item() == pytest.approx(expected.item(), rel=1e-12)
