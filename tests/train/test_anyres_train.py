"""LLaVA-NeXT's AnyRes through training: the loader's packs of mixed AnyRes and text-only samples give the loss
and gradients of the samples alone (packed = unpacked, and one pack = several micro-steps), a resumed run equals
the uninterrupted one, 1 process = 2 processes (gloo), the stage-2 export (tower trained at optim.vision_lr) is a
llava-hf LlavaNext directory that transformers loads with the same logits and whose image processor tiles as ours,
a LoRA run's PEFT adapter (with the trained image_newline) gives transformers the merged export's logits, and the
llava_next_7b_finetune recipe trains a tiny stand-in from LLaVA's JSON and image files through `train()`.

The tiny tower sees 28 px tiles as 2 x 2 patches; the pinpoints are LLaVA-NeXT's scaled by 1/12, and the image
sizes fall on every grid. Run as a script under torchrun, this file is the 2-process worker.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava import PackedBatch
from fastllava.anyres import grid_shape
from fastllava.config import load_config
from fastllava.testing import tiny_model as _tiny_model

from train_tiny import ARCHITECTURE, IMAGE_TOKEN, run, tiny_config

HERE = Path(__file__).parent
TILE = 28
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
CONFIG = dataclasses.replace(ARCHITECTURE, image_grid_pinpoints=PINPOINTS)
GRID = CONFIG.anyres
# (height, width): 1x3, 3x1, 2x2, 1x2, 2x1 grids, a 1 x N strip, a large image
SIZES = [(15, 65), (65, 15), (50, 45), (25, 50), (48, 20), (1, 150), (900, 1200)]
# what the toy runs override: packs and samples long enough for an image's tokens (at most 24 here)
ANYRES = ["data.max_tokens_per_pack=96", "data.model_max_length=64"]


def tiny_model(seed: int = 0):
    return _tiny_model(CONFIG, seed=seed)


class AnyResToy:
    """n samples with LlavaDataset's interface at this grid: every `text_every`-th text-only, one image (two for
    every 7th sample) of a size from SIZES, tiles random; lengths as the dataset counts them."""

    def __init__(self, n: int, seed: int = 0, text_every: int = 4):
        self.n, self.seed, self.text_every = n, seed, text_every

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(1, IMAGE_TOKEN, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = -100
        sizes = []
        if i % self.text_every:
            sizes = [SIZES[(i + j) % len(SIZES)] for j in range(1 + (i % 7 == 6))]
            for k in range(len(sizes)):  # the images at 0 and mid-sample, before the loss-carrying tail
                ids[k * (length // 3)] = IMAGE_TOKEN
        labels[ids == IMAGE_TOKEN] = -100
        tiles = sum(GRID.num_tiles(hw) for hw in sizes)
        pixels = torch.randn(tiles, 3, TILE, TILE, generator=g) if sizes else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_sizes": sizes, "id": str(i)}

    def lengths(self) -> np.ndarray:
        return np.asarray([len(s["input_ids"]) + sum(GRID.num_tokens(hw) - 1 for hw in s["image_sizes"])
                           for s in map(self.__getitem__, range(self.n))], dtype=np.int64)


def _pack(samples):
    return PackedBatch.from_samples(samples, image_token_id=IMAGE_TOKEN, num_image_tokens=CONFIG.num_image_tokens,
                                    anyres=GRID)


def test_the_toy_covers_every_grid():
    assert {grid_shape(hw, GRID.pinpoints, TILE) for hw in SIZES} == {(h // TILE, w // TILE) for h, w in PINPOINTS}


def test_packed_equals_unpacked_loss_and_grads():
    """One pack of AnyRes and text-only samples (images of every grid, one sample with two) gives the sum of
    the per-sample losses and gradients, the image_newline's included."""
    data = AnyResToy(8)
    samples = [data[i] for i in range(8)]
    assert any(s["pixel_values"] is None for s in samples) and any(len(s["image_sizes"]) == 2 for s in samples)
    model = tiny_model()
    packed = _loss_and_grads(model, [_pack(samples)])
    assert packed[2]["image_newline"].abs().sum() > 0
    alone = _loss_and_grads(model, [_pack([s]) for s in samples])
    assert packed[0] == pytest.approx(alone[0], rel=1e-6) and packed[1] == alone[1]
    for n, grad in alone[2].items():
        torch.testing.assert_close(packed[2][n], grad, rtol=1e-5, atol=1e-6, msg=n)


def _loss_and_grads(model, packs) -> tuple[float, int, dict]:
    """(summed loss, label tokens, gradients) of the packs' forwards and backwards."""
    model.zero_grad()
    loss, count = 0.0, 0
    for batch in packs:
        out = model(batch)
        out.loss_sum.backward()
        loss, count = loss + out.loss_sum.item(), count + int(out.num_label_tokens)
    return loss, count, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_step_independent_of_pack_budget(tmp_path):
    """The loader's AnyRes packs: the same steps with one pack per step and with several micro-steps."""
    common = ["train.max_steps=3", "train.unfreeze_vision=true", "optim.vision_lr=2e-4", "data.model_max_length=64"]
    one = run(tiny_config(tmp_path / "one", *common, "data.max_tokens_per_pack=1024"), tiny_model(), AnyResToy(24))
    many = run(tiny_config(tmp_path / "many", *common, "data.max_tokens_per_pack=64"), tiny_model(), AnyResToy(24))
    for step in (1, 2, 3):
        assert many.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step
        assert many.grad_norms[step] == pytest.approx(one.grad_norms[step], rel=1e-5), step


def test_resume_equals_the_uninterrupted_run(tmp_path):
    common = [*ANYRES, "train.max_steps=4", "optim.warmup_ratio=0.3", "train.unfreeze_vision=true"]
    full = run(tiny_config(tmp_path / "a", *common, "checkpoint.every_steps=2", "checkpoint.keep_last=0"),
               tiny_model(), AnyResToy(32))
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    model = tiny_model()
    with torch.no_grad():
        model.image_newline.add_(0.5)  # the checkpoint's must replace it
    resumed = run(tiny_config(tmp_path / "b", *common, f"checkpoint.resume={step2}"), model, AnyResToy(32))
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step
        assert resumed.grad_norms[step] == pytest.approx(full.grad_norms[step], rel=1e-6), step


def _hf_inputs(sample):
    """transformers' inputs of one sample: placeholders expanded by our count, pixel_values
    (n_images, max tiles, 3, S, S) zero-padded as its processor pads, image_sizes."""
    ids = _pack([sample]).input_ids[None]
    tiles = [GRID.num_tiles(hw) for hw in sample["image_sizes"]]
    padded = torch.zeros(len(tiles), max(tiles), 3, TILE, TILE)
    for k, part in enumerate(sample["pixel_values"].split(tiles)):
        padded[k, : tiles[k]] = part
    return {"input_ids": ids, "pixel_values": padded, "image_sizes": torch.tensor(sample["image_sizes"])}


def test_export_is_a_llava_next_directory_transformers_loads(tmp_path):
    """Stage 2 with the tower trained at its own lr: final/ loads in LlavaNextForConditionalGeneration with our
    trained model's logits; its LlavaNextImageProcessor (and the processor AutoProcessor builds) tiles and
    counts an image as our data path does."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextImageProcessor

    from fastllava.data.anyres_images import AnyRes, load_anyres
    from fastllava.data.images import Preprocess
    from fastllava.data.tokenize import load_tokenizer, prepare_tokenizer
    from fastllava.testing import write_llama_tokenizer

    r = run(tiny_config(tmp_path / "run", *ANYRES, "train.max_steps=2", "train.unfreeze_vision=true",
                        "optim.vision_lr=1e-4"), tiny_model(), AnyResToy(16))
    sample = AnyResToy(16)[6]  # two images
    assert len(sample["image_sizes"]) == 2
    with torch.no_grad():
        ours = r.model(_pack([sample]), return_logits=True).logits
        hf = LlavaNextForConditionalGeneration.from_pretrained(r.export).eval()
        theirs = hf(**_hf_inputs(sample)).logits[0]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert not torch.equal(hf.model.image_newline.detach(), tiny_model().image_newline.detach())  # it trained

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 130, 3), dtype=np.uint8))
    image.save(tmp_path / "im.png")
    processor = LlavaNextImageProcessor.from_pretrained(r.export)
    assert processor.image_grid_pinpoints == PINPOINTS
    theirs = processor(image, return_tensors="pt")
    tiles = load_anyres(tmp_path / "im.png", AnyRes(Preprocess(TILE, TILE), GRID.pinpoints))  # the Pillow path
    assert theirs["image_sizes"].tolist() == [[50, 130]]
    torch.testing.assert_close(theirs["pixel_values"][0, : len(tiles)], tiles, rtol=0, atol=1e-5)
    # A run that continues from it (model.source=pretrained) tiles with that file's per-tile steps, and refuses
    # a LlavaNextImageProcessor whose pinpoints are not the model's.
    from fastllava import Llava
    from fastllava.train.build import build_image_processor

    cfg = tiny_config(tmp_path / "next", "model.source=pretrained", "model.architecture=null",
                      f"model.pretrained_path={r.export}")
    assert build_image_processor(cfg, Llava.from_pretrained(r.export)) == Preprocess(TILE, TILE)
    with pytest.raises(ValueError, match="image_grid_pinpoints .* but the model's are"):
        build_image_processor(cfg, Llava.from_config(dataclasses.replace(CONFIG, image_grid_pinpoints=PINPOINTS[:2])))
    # With a tokenizer beside it (a real run's), AutoProcessor is transformers' LlavaNextProcessor, and it gives
    # an image as many <image> tokens as our count.
    tokenizer = load_tokenizer(write_llama_tokenizer(tmp_path / "tok"))
    prepare_tokenizer(tokenizer)
    tokenizer.save_pretrained(r.export)
    auto = AutoProcessor.from_pretrained(r.export)
    assert type(auto).__name__ == "LlavaNextProcessor"
    ids = auto(text="<image>\nhi", images=image, return_tensors="pt")["input_ids"][0]
    assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == GRID.num_tokens((50, 130))


def test_lora_adapter_carries_the_trained_image_newline(tmp_path):
    """An AnyRes LoRA run: PeftModel.from_pretrained(LlavaNext base, adapter/) gives the merged export's logits,
    image_newline (trained with the projector) included."""
    peft = pytest.importorskip("peft")
    from transformers import LlavaNextForConditionalGeneration

    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(base_dir)
    lora = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=0.02"]
    r = run(tiny_config(tmp_path / "run", *ANYRES, *lora, "train.max_steps=3"), tiny_model(), AnyResToy(24))
    adapter = tmp_path / "run" / "adapter"
    assert "base_model.model.model.image_newline" in _safetensors_keys(adapter / "adapter_model.safetensors")
    inputs = _hf_inputs(AnyResToy(16)[1])
    with torch.no_grad():
        merged = LlavaNextForConditionalGeneration.from_pretrained(r.export).eval()
        merged_logits = merged(**inputs).logits[0]
        base = LlavaNextForConditionalGeneration.from_pretrained(base_dir).eval()
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
        adapter_logits = adapted(**inputs).logits[0]
        newline = adapted.base_model.model.model.image_newline
    torch.testing.assert_close(newline, merged.model.image_newline, rtol=0, atol=0)
    assert (adapter_logits - merged_logits).abs().max() <= 1e-5 * merged_logits.abs().max()


def _safetensors_keys(path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_data_image_mode_and_the_models_grid_go_together(tmp_path):
    from fastllava.data.tokenize import load_tokenizer, prepare_tokenizer
    from fastllava.testing import write_llama_tokenizer
    from fastllava.train.build import build_dataset

    (tmp_path / "data.json").write_text("[]")
    tokenizer = load_tokenizer(write_llama_tokenizer(tmp_path / "tok"))
    prepare_tokenizer(tokenizer)
    for mode, model in (("square", tiny_model()), ("anyres", _tiny_model(ARCHITECTURE))):
        cfg = tiny_config(tmp_path, f"data.data_path={tmp_path / 'data.json'}", f"data.image_mode={mode}")
        with pytest.raises(ValueError, match=f"data.image_mode='{mode}' but the model's image_grid_pinpoints"):
            build_dataset(cfg, tokenizer, model)


def test_recipes_load_and_the_finetune_builds_a_tiny_stand_in(tmp_path):
    """The LLaVA-NeXT recipes: stage 1 is LLaVA-1.5's; stage 2 AnyRes at LLaVA-NeXT's grid with the tower at its
    own lr. model.source=components assembles an AnyRes model (its image_newline new, from model.init_seed)
    from a tower and an LLM directory, here tiny ones in place of the recipe's Hub ids."""
    from fastllava.anyres import DEFAULT_PINPOINTS
    from fastllava.data.tokenize import load_tokenizer, prepare_tokenizer
    from fastllava.testing import write_llama_tokenizer
    from fastllava.train.build import build_model

    configs = HERE.parents[1] / "recipes" / "configs"
    s1 = load_config(configs / "llava_next_7b_pretrain.yaml")
    s15 = load_config(configs / "llava15_7b_pretrain.yaml")
    assert (s1.train.stage, s1.optim.lr, s1.data.image_mode, s1.model.connector()) == \
           (s15.train.stage, s15.optim.lr, s15.data.image_mode, s15.model.connector())
    s2 = load_config(configs / "llava_next_7b_finetune.yaml")
    assert (s2.train.stage, s2.optim.lr, s2.optim.vision_lr, s2.train.unfreeze_vision) == ("finetune", 2e-5, 2e-6, True)
    assert (s2.train.global_batch_size, s2.train.epochs, s2.data.image_mode, s2.data.model_max_length) == \
           (128, 1, "anyres", 4096)
    assert s2.model.connector()["image_grid_pinpoints"] == [list(p) for p in DEFAULT_PINPOINTS]
    assert s2.model.projector_weights == f"{s1.train.output_dir}/projector.safetensors"
    assert (s2.model.vision_path, s2.model.llm_path) == ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5")

    # the stand-in: a tiny tower of 336 px tiles (2 x 2 patches of 168 px, so that LLaVA-NeXT's pinpoints fit it)
    # and a tiny LLM, as directories in place of the recipe's Hub ids
    vision = dataclasses.replace(ARCHITECTURE.vision, image_size=336, patch_size=168)
    _tiny_model(dataclasses.replace(ARCHITECTURE, vision=vision)).save_components(tmp_path / "vision", tmp_path / "llm")
    tokenizer = load_tokenizer(write_llama_tokenizer(tmp_path / "tok"))
    ids = prepare_tokenizer(tokenizer)
    cfg = load_config(configs / "llava_next_7b_finetune.yaml", [
        f"model.vision_path={tmp_path / 'vision'}", f"model.llm_path={tmp_path / 'llm'}",
        "model.projector_weights=null", "model.architecture.vision_feature_layer=-1"])
    model = build_model(cfg, ids)
    assert model.config.anyres == dataclasses.replace(GRID, pinpoints=DEFAULT_PINPOINTS, tile=336)
    fresh = build_model(cfg, ids)
    torch.testing.assert_close(model.image_newline, fresh.image_newline, rtol=0, atol=0)  # seeded
    assert model.image_newline.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 1 vs 2 processes

TWO_PROCESS_RUN = [*ANYRES, "train.max_steps=3", "train.unfreeze_vision=true", "optim.vision_lr=1e-4",
                   "data.max_tokens_per_pack=64"]


def _run_for_comparison(out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    r = run(tiny_config(out, *TWO_PROCESS_RUN), tiny_model(), AnyResToy(40, text_every=2))
    full = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"losses": r.losses, "grad_norms": r.grad_norms, "params": {k: v.clone() for k, v in full.items()}}


@pytest.mark.slow
def test_one_and_two_processes_agree(tmp_path):
    """2 gloo ranks: each rank's packs carry their own AnyRes images (a rank with only text samples gets the
    filler image, tiled at the grid); losses, gradient norms and parameters are the one-process run's."""
    from fastllava.data.loader import StepLoader

    fillers = []  # the premise: at 2 ranks, some micro-steps of these 3 steps hold only text samples
    for rank in (0, 1):
        loader = StepLoader(AnyResToy(40, text_every=2), global_batch=8, max_tokens=64, rank=rank, world_size=2,
                            epochs=1, seed=0, image_token_id=IMAGE_TOKEN, num_image_tokens=CONFIG.num_image_tokens,
                            filler_image=torch.zeros(3, TILE, TILE), anyres=GRID)
        loader.stop_step = 3
        fillers += [mb.filler for _, micro in loader for mb in micro]
    assert any(fillers)
    one = _run_for_comparison(tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "results.pt", weights_only=False)
    assert sorted(one["losses"]) == sorted(two["losses"]) == [1, 2, 3]
    for step, loss in one["losses"].items():
        assert abs(loss - two["losses"][step]) <= 1e-5 * abs(loss), step
        assert abs(one["grad_norms"][step] - two["grad_norms"][step]) <= 1e-5 * one["grad_norms"][step], step
    for key, value in one["params"].items():
        torch.testing.assert_close(two["params"][key], value, rtol=1e-5, atol=2e-5, msg=key)


if __name__ == "__main__":  # the 2-process worker of test_one_and_two_processes_agree
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = _run_for_comparison(Path(sys.argv[1]))
    if dist.get_rank() == 0:
        torch.save(results, Path(sys.argv[1]) / "results.pt")
    dist.destroy_process_group()


def test_the_finetune_recipe_trains_on_image_files_and_exports(tmp_path):
    """What a user runs, on a tiny stand-in: `train()` of llava_next_7b_finetune.yaml with its data as LLaVA's
    JSON and image files of several aspect ratios (the dataset's header lengths, the tiles, the tower at its
    own lr), then transformers' AutoProcessor and LlavaNextForConditionalGeneration on the export."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from fastllava.anyres import DEFAULT_PINPOINTS
    from fastllava.testing import write_llama_tokenizer
    from fastllava.train import train

    vision = dataclasses.replace(ARCHITECTURE.vision, image_size=336, patch_size=168)
    text = dataclasses.replace(ARCHITECTURE.text, max_position_embeddings=1024)
    _tiny_model(dataclasses.replace(ARCHITECTURE, vision=vision, text=text)).save_components(
        tmp_path / "vision", tmp_path / "llm")
    write_llama_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    records = []
    for k, (h, w) in enumerate([(200, 500), (500, 200), (400, 380), (1, 700), (300, 300), (90, 900)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"thing {k}"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hello?"},
                                                     {"from": "gpt", "value": "Hi there."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = load_config(HERE.parents[1] / "recipes" / "configs" / "llava_next_7b_finetune.yaml", [
        f"model.vision_path={tmp_path / 'vision'}", f"model.llm_path={tmp_path / 'llm'}",
        f"model.tokenizer_path={tmp_path / 'tok'}", "model.projector_weights=null",
        "model.architecture.vision_feature_layer=-1", f"data.data_path={tmp_path / 'data.json'}",
        f"data.image_folder={tmp_path / 'images'}", "data.model_max_length=1024", "data.max_tokens_per_pack=1024",
        "data.num_workers=0", "train.global_batch_size=4", "train.max_steps=2", "train.device=cpu",
        f"train.output_dir={tmp_path / 'run'}", "parallel.activation_checkpointing=none", "logging.progress=false",
        "checkpoint.every_steps=0"])
    r = train(cfg)
    assert sorted(r.losses) == [1, 2] and all(np.isfinite(list(r.losses.values())))
    processor = AutoProcessor.from_pretrained(r.export)
    hf = LlavaNextForConditionalGeneration.from_pretrained(r.export).eval()
    image = Image.open(tmp_path / "images" / "0.png")
    inputs = processor(text="USER: <image>\nWhat is in the picture? ASSISTANT:", images=image, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    grid = dataclasses.replace(GRID, pinpoints=DEFAULT_PINPOINTS, tile=336)  # the recipe's, on 2 x 2 patches
    assert int((inputs["input_ids"] == image_id).sum()) == grid.num_tokens((200, 500))
    with torch.no_grad():
        assert torch.isfinite(hf(**inputs).logits).all()
