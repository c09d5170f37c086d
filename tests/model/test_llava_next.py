"""LLaVA-NeXT's AnyRes on packed batches, against transformers' LlavaNextForConditionalGeneration.

The pixels come from transformers' LlavaNextImageProcessor (its Pillow backend), the reference the data side's
tiling is held to (tests/data/test_anyres.py); the tile counts from transformers' image_size_to_num_patches. The
tiny tower sees 56 px tiles as 4 x 4 patches, so unpadding cuts whole feature rows and columns; the pinpoints are
LLaVA-NeXT's defaults scaled by 1/6, and the images are picked so that each grid (1x2, 2x1, 2x2, 1x3, 3x1) is
used, with odd and even cuts.
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_no_host_sync import recorded_micro_step
from tiny_llava import IMAGE_TOKEN, rel_err
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from fastllava import Llava, PackedBatch
from fastllava.testing import TORCH_BACKENDS, tiny_config, tiny_hf_llava, tiny_model
from fastllava.train.freeze import set_trainable

TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
# (height, width): 1x3, 3x1, 2x2, 1x2, 2x1 grids, then a very wide and a very large one.
SIZES = [(30, 130), (130, 30), (100, 90), (50, 100), (97, 41), (3, 200), (900, 1700)]


def next_config(text=None, **fields):
    return tiny_config(vision={"image_size": TILE}, text={"max_position_embeddings": 512, **(text or {})},
                       **{"image_grid_pinpoints": PINPOINTS, **fields})


def processor_pixels(sizes, seed=0):
    """transformers' pixel_values of random images of `sizes`, each image's tiles (base first) in turn, and
    each image's tile count by transformers' own formula."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                           image_grid_pinpoints=PINPOINTS)
    out = processor(images, return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(s) for s in sizes]
    tiles = [image_size_to_num_patches(list(s), PINPOINTS, TILE) for s in sizes]
    return torch.cat([pv[:n] for pv, n in zip(out["pixel_values"], tiles)]), tiles


def make_samples(seed=0):
    """Four samples: one wide image + text, text only, two images of other grids, then the rest of SIZES."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, IMAGE_TOKEN, (n,), generator=g)

    layouts = [[SIZES[0]], [], [SIZES[1], SIZES[2]], SIZES[3:]]
    samples = []
    for k, sizes in enumerate(layouts):
        parts = [torch.tensor([1]), text(3 + k)]
        for _ in sizes:
            parts += [torch.tensor([IMAGE_TOKEN]), text(2)]
        ids = torch.cat(parts + [text(7)])
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        labels[ids == IMAGE_TOKEN] = -100
        pixels = processor_pixels(sizes, seed + k)[0] if sizes else None
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_sizes": sizes})
    return samples


def pack(samples, config):
    return PackedBatch.from_samples(samples, image_token_id=config.image_token_id,
                                    num_image_tokens=config.num_image_tokens, anyres=config.anyres)


def hf_inputs(sample, config):
    """transformers' inputs of one sample: input_ids (1, L) with its placeholders expanded by our count
    (transformers refuses a count that differs from its features), pixel_values (n_images, max tiles, 3, S, S)
    zero-padded as its processor pads them, image_sizes (n_images, 2)."""
    ids = pack([sample], config).input_ids[None]
    if sample["pixel_values"] is None:
        return ids, {}
    tiles = [image_size_to_num_patches(list(hw), PINPOINTS, TILE) for hw in sample["image_sizes"]]
    padded = torch.zeros(len(tiles), max(tiles), *sample["pixel_values"].shape[1:])
    for k, part in enumerate(sample["pixel_values"].split(tiles)):
        padded[k, : tiles[k]] = part
    return ids, {"pixel_values": padded, "image_sizes": torch.tensor(sample["image_sizes"])}


@torch.no_grad()
def hf_logits_per_sample(hf, samples, config):
    """transformers run on each sample alone, logits concatenated in pack order."""
    out = []
    for s in samples:
        ids, images = hf_inputs(s, config)
        out.append(hf(input_ids=ids, **images).logits[0].float())
    return torch.cat(out)


@pytest.fixture(scope="module")
def hf_next():
    return tiny_hf_llava(next_config(), seed=1)


def test_the_images_cover_every_grid_and_both_cuts():
    """The premise of the parity tests: every pinpoint is some image's grid, and unpadding cuts rows on some
    images, columns on others, nothing on others."""
    grids = {tuple(get_anyres_image_grid_shape(list(s), PINPOINTS, TILE)) for s in SIZES}
    assert grids == {(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)}
    anyres, side = next_config().anyres, TILE // 14
    tokens = [anyres.num_tokens(s) - side * side for s in SIZES]
    shapes = [get_anyres_image_grid_shape(list(s), PINPOINTS, TILE) for s in SIZES]
    full = [r * side * (c * side + 1) for r, c in shapes]
    assert any(t < f for t, f in zip(tokens, full)) and any(t == f for t, f in zip(tokens, full))


def test_packed_logits_match_transformers_per_sample(hf_next, tmp_path):
    hf_next.save_pretrained(tmp_path)
    model = Llava.from_pretrained(tmp_path).eval()
    assert model.config.anyres is not None and model.config.image_grid_pinpoints == PINPOINTS
    samples = make_samples()
    batch = pack(samples, model.config)
    assert batch.num_images == len(SIZES) and batch.pixel_values.shape[0] == sum(processor_pixels(SIZES)[1])
    with torch.no_grad():
        out = model(batch, return_logits=True)
    expected = hf_logits_per_sample(hf_next, samples, model.config)
    assert out.logits.shape == expected.shape
    assert rel_err(out.logits, expected) <= 1e-5
    targets = batch.shifted_labels()
    ref_sum = F.cross_entropy(expected, targets, ignore_index=-100, reduction="sum")
    assert torch.allclose(out.loss_sum, ref_sum, rtol=1e-5)


def test_greedy_generation_matches_transformers(hf_next, tmp_path):
    """Prompts of very different lengths (no image, one, two, four images) decoded together with the KV cache
    give transformers' greedy tokens of each prompt alone (no EOS: every sequence runs max_new_tokens)."""
    hf_next.save_pretrained(tmp_path)
    model = Llava.from_pretrained(tmp_path).eval()
    hf_next.generation_config.eos_token_id = None
    hf_next.generation_config.pad_token_id = 0
    samples, expected = make_samples(3), []
    for s in samples:
        ids, images = hf_inputs(s, model.config)
        out = hf_next.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, **images)
        expected.append(out[0, ids.shape[1]:].tolist())
    prompts = [{"input_ids": s["input_ids"].tolist(), "pixel_values": s["pixel_values"],
                "image_sizes": s["image_sizes"]} for s in samples]
    assert model.generate(prompts, max_new_tokens=8) == expected
    with pytest.raises(ValueError, match="prompt 0: 1 image tokens .* 0 image_sizes"):
        model.generate([{**prompts[0], "image_sizes": None}], max_new_tokens=1)


def test_a_llava_hf_directory_chats_as_transformers_generates(tmp_path):
    """What chat and eval do with a llava-hf LLaVA-NeXT directory (its tokenizer, its LlavaNextImageProcessor
    config, image files of three aspect ratios, one prompt with two images): make_prompt's tiles and counts,
    then greedy generation, give transformers' tokens from its own processor's pixels."""
    from fastllava.data.tokenize import load_tokenizer
    from fastllava.generate.inputs import image_processor, load_model, make_prompt
    from fastllava.testing import write_llama_tokenizer

    tokenizer = load_tokenizer(write_llama_tokenizer(tmp_path / "model"))
    config = next_config(text={"vocab_size": 512}, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    tiny_model(config, seed=7).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(str(tmp_path / "model"))
    hf_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=PINPOINTS)
    hf_processor.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(1)
    files = []
    for k, (h, w) in enumerate([(30, 130), (130, 30), (100, 90)]):
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    model, tokenizer = load_model(tmp_path / "model", dtype="fp32", device="cpu")
    processor = image_processor(model.config, tmp_path / "model")
    questions = [([f], "<image>\nWhat is in the image?") for f in files] + [(files[:2], "<image>\n<image>\nCompare.")]
    prompts = [make_prompt([{"from": "human", "value": text}], images, tokenizer, model, "vicuna_v1", processor)
               for images, text in questions]
    assert [p["image_sizes"] for p in prompts[:3]] == [[(30, 130)], [(130, 30)], [(100, 90)]]

    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    expected = []
    for prompt, (images, _) in zip(prompts, questions):
        pixels = hf_processor([Image.open(f).convert("RGB") for f in images], return_tensors="pt")
        tiles = [image_size_to_num_patches(hw.tolist(), PINPOINTS, TILE) for hw in pixels["image_sizes"]]
        sample = {"input_ids": torch.tensor(prompt["input_ids"]), "labels": torch.tensor(prompt["input_ids"]),
                  "pixel_values": torch.cat([pv[:n] for pv, n in zip(pixels["pixel_values"], tiles)]),
                  "image_sizes": prompt["image_sizes"]}
        ids, inputs = hf_inputs(sample, model.config)
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          **inputs)
        expected.append(out[0, ids.shape[1]:].tolist())
    assert model.generate(prompts, max_new_tokens=6) == expected


def test_the_tower_runs_once_over_every_tile_of_the_pack(hf_next, tmp_path):
    hf_next.save_pretrained(tmp_path)
    model = Llava.from_pretrained(tmp_path)
    seen = []
    model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    batch = pack(make_samples(), model.config)
    model(batch)
    assert seen == [sum(batch.image_tile_counts)]


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = tiny_model(next_config(), seed=4)
    model.save_pretrained(tmp_path)
    hf, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert torch.equal(hf.model.image_newline, model.image_newline)
    samples = make_samples(2)
    with torch.no_grad():
        ours = model(pack(samples, model.config), return_logits=True).logits
    assert rel_err(ours, hf_logits_per_sample(hf.eval(), samples, model.config)) <= 1e-5
    back = Llava.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_original_layout_round_trip(tmp_path):
    """A projector llava-hf cannot hold goes to the original LLaVA(-NeXT) layout; image_newline and the grid
    come back."""
    model = tiny_model(next_config(projector_type="linear"), seed=5)
    model.save_pretrained(tmp_path)
    back = Llava.from_pretrained(tmp_path)
    assert back.config.image_grid_pinpoints == PINPOINTS
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_original_llava_next_layout_reads_as_transformers(hf_next, tmp_path):
    """LLaVA-NeXT's own layout (LlavaLlamaForCausalLM, model.image_newline, anyres + spatial_unpad, pinpoints as
    (width, height) pairs, the tower in its own CLIP directory) computes transformers' logits."""
    import json

    from safetensors.torch import save_file
    from test_hf_interop import original_llava_state, save_as_clip

    save_as_clip(hf_next, tmp_path / "clip")
    state = {**original_llava_state(hf_next), "model.image_newline": hf_next.model.image_newline.detach().clone()}
    (tmp_path / "orig").mkdir()
    save_file(state, tmp_path / "orig" / "model.safetensors")
    text = hf_next.config.text_config.to_dict()
    config = {
        **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                "max_position_embeddings")},
        "rope_theta": 10000.0, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": str(tmp_path / "clip"), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[w, h] for h, w in PINPOINTS],
    }
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    model = Llava.from_pretrained(tmp_path / "orig", image_token_id=IMAGE_TOKEN)
    assert model.config.image_grid_pinpoints == PINPOINTS
    samples = make_samples(4)
    with torch.no_grad():
        ours = model(pack(samples, model.config), return_logits=True).logits
    assert rel_err(ours, hf_logits_per_sample(hf_next, samples, model.config)) <= 1e-5
    for change, message in (({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type 'spatial'"),
                            ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio 'anyres_max_9'")):
        (tmp_path / "orig" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            Llava.from_pretrained(tmp_path / "orig")


def test_micro_step_reads_nothing_on_the_host_and_trains_the_newline(monkeypatch):
    model = tiny_model(next_config())
    set_trainable(model, "finetune")
    found, _ = recorded_micro_step(model, pack(make_samples(), model.config), monkeypatch)
    assert found == []
    assert model.image_newline.grad is not None and model.image_newline.grad.abs().sum() > 0


def test_micro_step_under_fake_tensors_counts_every_tile():
    """The AnyRes micro-step runs on fake tensors (how memplan plans a 7B), and the projector FLOPs counted by
    the op's formula are those of flops.py for the pack's tiles, not its images."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from fastllava.flops import pack_stats

    config = next_config()
    batch = pack(make_samples(), config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Llava(config, TORCH_BACKENDS)
        set_trainable(model, "finetune")
        with FlopCounterMode(display=False) as counter:
            out = model(batch)
            out.loss_sum.backward()
        assert model.image_newline.grad is not None
    tiles = pack_stats(batch)[2]
    assert tiles == batch.pixel_values.shape[0] > batch.num_images
    n, c, d = tiles * config.num_image_tokens, config.vision.hidden_size, config.text.hidden_size
    assert counter.get_flop_counts()["Global"][torch.ops.fastllava.fused_mlp_projector] == 2 * n * c * d + 2 * n * d * d


def test_merge_kernel_in_the_interpreter_with_ragged_image_counts():
    """Images of different token counts are one flat run of feature rows for the merge: the Triton kernel (in
    the interpreter on CPU) places them and routes their gradients as the torch path does."""
    config = next_config()
    batch = pack(make_samples(), config)
    assert len(set(batch.image_token_counts)) == 5  # ragged: 16 (the 3 x 200 image keeps no grid row) to 88
    grads = []
    for merge in ("torch", "triton"):
        model = tiny_model(config, backends=dataclasses.replace(TORCH_BACKENDS, merge=merge))
        set_trainable(model, "finetune")
        out = model(batch, return_logits=True)
        out.loss_sum.backward()
        grads.append([out.logits.detach(), model.image_newline.grad, model.projector.linears[0].weight.grad,
                      model.language_model.embed_tokens.weight.grad])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_image_newline_trains_with_the_projector():
    """In both stages and under LoRA (LLaVA-NeXT's stage 2 trains it with everything but the tower)."""
    from fastllava.layers.lora import apply_lora

    model = tiny_model(next_config())
    apply_lora(model, rank=2, alpha=4.0)
    for stage in ("align", "finetune"):
        model.image_newline.requires_grad_(False)
        set_trainable(model, stage)
        assert model.image_newline.requires_grad
    set_trainable(tiny_model(), "finetune")  # a fixed-resolution model has none


@pytest.mark.parametrize("meta", [False, True])
def test_components_config_checks_pinpoints_against_its_checkpoints_tower(tmp_path, meta):
    """A run's model.architecture with model.source=components holds only the connector fields, beside a
    stand-in 336 px tower: its pinpoints are checked against the tower the checkpoint holds, as a SigLIP-384
    LLaVA-NeXT's multiples of 384 need (scaled down here: a 48 px tower)."""
    from fastllava.config import load_config
    from fastllava.data.tokenize import TokenizerIds
    from fastllava.train.build import build_model

    tiny_model(tiny_config(vision={"image_size": 48})).save_components(tmp_path / "tower", tmp_path / "llm")

    def build(pinpoints):
        cfg = load_config(None, ["model.source=components", f"model.vision_path={tmp_path / 'tower'}",
                                 f"model.llm_path={tmp_path / 'llm'}",
                                 f"model.architecture={{image_grid_pinpoints: {pinpoints}}}"])
        return build_model(cfg, TokenizerIds(IMAGE_TOKEN, 0, 128), meta=meta)

    pinpoints = [[48, 96], [96, 48], [96, 96]]
    grid = build(pinpoints).config.anyres
    assert (grid.tile, grid.pinpoints) == (48, tuple(map(tuple, pinpoints)))
    with pytest.raises(ValueError, match=r"\[\(56, 112\)\] are not positive multiples of the tower's image_size 48"):
        build([[48, 96], [56, 112]])


def test_components_start_with_a_new_seeded_newline(tmp_path):
    """Stage 2 from a tower, an LLM and a stage-1 projector: the newline is drawn from the seed, everything else
    is the checkpoints'."""
    model = tiny_model(next_config(), seed=6)
    model.save_components(tmp_path / "tower", tmp_path / "llm")
    model.save_projector(tmp_path / "projector.safetensors")
    args = (tmp_path / "tower", tmp_path / "llm", tmp_path / "projector.safetensors")
    loaded = Llava.from_components(*args, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, seed=1)
    assert torch.equal(Llava.from_components(*args, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
                                             seed=1).image_newline, loaded.image_newline)
    assert not torch.equal(loaded.image_newline, model.image_newline)
    # The sharded loader (here one process, unsharded parameters) places the same tensors from the same plan.
    from fastllava.model.hf import plan_components
    from fastllava.train.sharded_load import load_sharded

    plan = plan_components(*args, seed=1, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
    sharded = plan.build(Llava).to_empty(device="cpu")
    load_sharded(sharded, plan)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sharded.state_dict().values()))
    with torch.no_grad():
        loaded.image_newline.copy_(model.image_newline)
    batch = pack(make_samples(), model.config)
    with torch.no_grad():
        assert torch.equal(loaded(batch, return_logits=True).logits, model(batch, return_logits=True).logits)


def test_text_only_pack_of_an_anyres_model():
    model = tiny_model(next_config())
    text = [s for s in make_samples() if s["pixel_values"] is None]
    batch = pack(text, model.config)
    assert batch.num_images == 0 and batch.feature_index.numel() == 0
    assert torch.isfinite(model(batch).loss_sum)


def test_a_batch_for_another_grid_is_refused():
    model = tiny_model(next_config())
    fixed = tiny_config(vision={"image_size": TILE})
    sample = {**make_samples()[0], "pixel_values": torch.randn(1, 3, TILE, TILE), "image_sizes": None}
    batch = PackedBatch.from_samples([sample], image_token_id=IMAGE_TOKEN, num_image_tokens=fixed.num_image_tokens)
    with pytest.raises(ValueError, match="AnyRes grid None"):
        model(batch)
    other = next_config(image_grid_pinpoints=PINPOINTS[3:4])  # the same 1x3 grid for this image, another list
    with pytest.raises(ValueError, match="AnyRes grid"):
        model(pack(make_samples()[:1], other))


def test_bad_anyres_samples_and_batches_are_named():
    config = next_config()
    s = make_samples()
    with pytest.raises(ValueError, match=r"sample 0: 1 image tokens but 0 image_sizes"):
        pack([{**s[0], "image_sizes": []}], config)
    with pytest.raises(ValueError, match=r"sample 1: images of sizes .* but pixel_values has 3 rows"):
        pack([s[1], {**s[0], "pixel_values": s[0]["pixel_values"][:3]}], config)
    batch = pack(s, config)
    counts = list(batch.image_token_counts)
    counts[1], counts[2] = counts[2], counts[1]
    bad = [
        (dict(image_token_counts=tuple(counts)), "image 1 of size"),
        (dict(feature_index=batch.feature_index[1:]), "feature_index"),
        (dict(pixel_values=batch.pixel_values[1:]), "pixel_values of"),
        (dict(image_sizes=batch.image_sizes[:-1]), "one per image"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(batch, **change).check()


def test_placeholders_must_split_into_whole_images():
    """Two images' placeholders swapped between samples keep the totals but not the runs."""
    config = next_config()
    s = make_samples()
    batch = pack([s[0], s[2]], config)  # images of 1 + 2 runs
    counts = batch.image_token_counts
    ids = batch.input_ids.clone()
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    ids[first + counts[0]] = IMAGE_TOKEN  # the first run one longer...
    ids[(ids == IMAGE_TOKEN).nonzero()[-1]] = 5  # ...and the last one shorter
    with pytest.raises(ValueError, match="whole images"):
        dataclasses.replace(batch, input_ids=ids).check()


def test_cls_features_are_refused_with_anyres():
    with pytest.raises(ValueError, match="vision_feature_select 'patch'"):
        next_config(vision_feature_select="cls_patch")
    with pytest.raises(ValueError, match="multiples of the tower's image_size"):
        tiny_model(next_config(image_grid_pinpoints=[[56, 100]]))
