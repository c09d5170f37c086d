"""The demo's stand-ins for the two checkpoints LLaVA-1.5 starts from: a CLIP directory and a LLaMA directory.

The paper takes OpenAI's CLIP ViT-L/14 (trained contrastively on image-caption pairs) and Vicuna; nothing
can be downloaded here, so the demo makes tiny ones: a tower initialized at random and trained CLIP-style on
the world's captions (demo/tower.py), and an LLM left at its random initialization, with the world's
tokenizer. Both are written as ordinary Hugging Face directories (`Llava.save_components`) that the
trainer then loads exactly as it loads the real ones (`model.source=components`).

Made once per setting by rank 0 under the world's directory, renamed into place when complete, reused by
later runs and by the other ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenize import load_tokenizer, prepare_tokenizer
from ..model import Llava, LlavaConfig
from ..train.distributed import DistEnv, barrier
from .tower import load_captioned_images, pretrain_vision_tower
from .world import DemoPaths

FORMAT_VERSION = 2  # bump when what is written changes (2: bigrams in the tower's text side)


@dataclass(frozen=True)
class Components:
    """The two directories the trainer loads as `model.source=components`."""

    vision_dir: Path  # a CLIPVisionModel directory
    llm_dir: Path  # a LlamaForCausalLM directory with the world's tokenizer


def make_components(settings, world: DemoPaths, *, vision_feature_layer: int, image_mode: str, env: DistEnv,
                    show_progress: bool = True) -> Components:
    """The tower and LLM of `settings` (a DemoSettings) for `world`, made if not made before."""
    key = {"format": FORMAT_VERSION, "world": world.root.name, "seed": settings.seed,
           "vision": dataclasses.asdict(settings.vision), "text": dataclasses.asdict(settings.text),
           "feature_layer": vision_feature_layer, "image_mode": image_mode, "steps": settings.tower_steps,
           "batch": settings.tower_batch, "lr": settings.tower_lr}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = world.root / f"components-{digest}"
    if env.is_main and not (root / "COMPLETE.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=world.root))
        try:
            _make(settings, world, tmp, vision_feature_layer, image_mode, show_progress)
            (tmp / "COMPLETE.json").write_text(json.dumps(key))
            shutil.rmtree(root, ignore_errors=True)  # an interrupted earlier attempt
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return Components(root / "vision", root / "llm")


def _make(settings, world: DemoPaths, out: Path, vision_feature_layer: int, image_mode: str,
          show_progress: bool) -> None:
    tokenizer = load_tokenizer(world.tokenizer_dir)
    special = prepare_tokenizer(tokenizer)
    # The vocabulary rounded up to 64, as the trainer's resize does: the LLM is made at its final size.
    text = dataclasses.replace(settings.text, vocab_size=-(-special.vocab_size // 64) * 64)
    config = LlavaConfig(vision=settings.vision, text=text, vision_feature_layer=vision_feature_layer,
                         image_token_id=special.image_token_id, pad_token_id=special.pad_token_id)
    model = Llava.from_config(config, seed=settings.seed)
    t0 = time.perf_counter()
    pairs = load_captioned_images(str(world.pretrain_json), str(world.image_folder), tokenizer,
                                  image_mode=image_mode, image_size=config.vision.image_size)
    # The other local ranks wait at make_components' barrier: their CPU threads are free meanwhile.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(os.cpu_count() or 1, threads * int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    try:
        losses = pretrain_vision_tower(model.vision_tower, pairs, len(tokenizer), steps=settings.tower_steps,
                                       batch_size=settings.tower_batch, lr=settings.tower_lr, seed=settings.seed,
                                       show_progress=show_progress)
    finally:
        torch.set_num_threads(threads)
    print(f"vision tower: {len(pairs.caption_ids):,} captioned images ({pairs.skipped_text_only} text-only "
          f"skipped), {len(losses)} contrastive steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.save_components(out / "vision", out / "llm")
    tokenizer.save_pretrained(str(out / "llm"))
