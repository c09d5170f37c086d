"""The end of a run: the trained weights gathered from their FSDP shards and written for others to load.

Stage 1 writes `<output_dir>/projector.safetensors` (LLaVA's `mm_projector` key names; stage 2 and LLaVA's
own tools read it). Stage 2 writes `<output_dir>/final/`, a llava-hf directory with the tokenizer, which
transformers' `LlavaForConditionalGeneration.from_pretrained` loads. Collective: every rank calls
`export`; rank 0 writes.

Memory: `get_model_state_dict(full_state_dict=True, cpu_offload=True)` all-gathers one parameter at a
time and keeps the host copy on rank 0 only (the other ranks get an empty dict), so rank 0 holds the
whole fp32 model while writing, the others nothing beyond their shards. The tensors the forward never
uses (`model.carried`) are kept by rank 0 only after a sharded load (train/sharded_load.py): rank 0 is
the only writer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..model import Llava
from .distributed import DistEnv, barrier


def export(model, stage: str, output_dir: str | Path, env: DistEnv, tokenizer=None) -> Path:
    """Write the stage's export; returns its path (on every rank)."""
    out = Path(output_dir)
    if stage == "align":
        # Only the projector is needed: gathering it alone keeps stage 1's export tiny.
        state = {n: p.full_tensor().detach().cpu() for n, p in model.projector.named_parameters()}
        path = out / "projector.safetensors"
        if env.is_main:
            with torch.device("meta"):
                shell = Llava(model.config)
            shell.projector.load_state_dict(state, assign=True)
            shell.save_projector(path)
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = out / "final"
        if env.is_main:
            model.save_pretrained(path, state=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path))
    barrier()
    return path
