"""The end of a run: the trained weights gathered from their FSDP shards and written for others to load.

Stage 1 writes `<output_dir>/projector.safetensors` (LLaVA's `mm_projector` key names; stage 2 and LLaVA's
own tools read it). Stage 2 writes `<output_dir>/final/` (Llava.save_pretrained: a llava-hf directory for
the mlp2x_gelu projector, which transformers' `LlavaForConditionalGeneration.from_pretrained` loads, the
original LLaVA layout for others) with the tokenizer, the run's image processor as the
`preprocessor_config.json` of the transformers processor that does the same (an AnyRes model's: a
LlavaNextImageProcessor at its grid pinpoints, with the processor_config.json of the LlavaNextProcessor that
transformers' AutoProcessor builds around it), and `fastllava.json`, the
conversation template the run trained on (chat and eval prompt and preprocess as the run did unless told
otherwise: generate/inputs.py); after LoRA fine-tuning
`final/` holds the merged weights and `<output_dir>/adapter/` the adapters alone in PEFT's format
(model/peft.py). Collective: every rank calls `export`; rank 0 writes.

Memory: the parameters are gathered one at a time, in the same order on every rank (each DTensor's
all-gather is a collective), and handed to rank 0's writer as they come; the writer holds at most one
safetensors shard (model/safetensors_io.py ShardWriter, 5 GiB by default) plus the tensor in hand, never the model.
The tensors the forward never uses (`model.carried`) are kept by rank 0 only after a sharded load
(train/sharded_load.py): rank 0 is the only writer.

A failed write (a full disk, an I/O error) raises ExportWriteError on every rank, naming the file, the
export's size and the free space, and removes what it had written: rank 0 still takes part in the rest of
the all-gathers and the ranks then exchange the outcome, so no rank waits forever for the writer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..data.files import IMAGE_TAG
from ..data.images import PREPROCESSOR_FILE
from ..layers.lora import is_adapter, lora_modules
from ..model import Llava
from .checkpoint import attempt_write, failures_text, gather_failures
from .distributed import DistEnv, barrier
from .sharded_load import unwrapped_name


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: all-gathered from its FSDP shards (collective), or itself."""
    return param.full_tensor() if isinstance(param, DTensor) else param


@torch.no_grad()
def gathered_parameters(model, keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on the host) of every parameter, one at a time, names without wrapper parts.
    A LoRA layer's weight comes merged, W + (alpha / r) B A in its stored dtype, and its adapters are left
    out. Collective: every rank must exhaust the iterator; ranks with `keep` False receive nothing."""
    adapted = {unwrapped_name(n): m for n, m in lora_modules(model).items()}
    for name, param in model.named_parameters():
        name = unwrapped_name(name)
        if is_adapter(name):
            continue
        full = _full(param)
        module = adapted.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if module is not None:
            a, b = _full(module.lora_a), _full(module.lora_b)
            if keep:
                full = (full.float() + module.delta(a, b)).to(full.dtype)
        if keep:
            yield name, full.detach().cpu()


# The export's record of how the model is prompted; generate/inputs.py RUN_FILE reads it (the same name: generate/
# does not import train/, tests/train/test_model_template.py writes one and reads it back).
RUN_FILE = "fastllava.json"
PROCESSOR_FILE = "processor_config.json"  # transformers' ProcessorMixin settings file


class ExportWriteError(RuntimeError):
    """The export could not be written (full disk, I/O error); raised on every rank."""


def export(model, stage: str, output_dir: str | Path, env: DistEnv, tokenizer=None, lora=None,
           base_model: str | None = None, template: str | None = None, processor=None) -> Path:
    """Write the stage's export; returns its path (on every rank). lora: the run's LoRAConfig when
    adapters were trained (also writes `adapter/`, for `base_model`, the checkpoint the run started from).
    template: the conversation template the run trained on, recorded in final/fastllava.json. processor: the
    run's image processor (data.images.Preprocess), written as final/preprocessor_config.json.
    Raises ExportWriteError on every rank if rank 0 cannot write it."""
    out = Path(output_dir)
    failure = None  # rank 0's write error; the collectives go on without its writer
    if stage == "align":
        # Only the projector is needed: gathering it alone keeps stage 1's export tiny.
        state = {n: _full(p).detach().cpu() for n, p in model.projector.named_parameters()}
        path, written = out / "projector.safetensors", [out / "projector.safetensors"]
        if env.is_main:
            with torch.device("meta"):
                shell = Llava(model.config)
            shell.projector.load_state_dict(state, assign=True)
            failure = attempt_write(lambda: shell.save_projector(path))
    else:
        path, written = out / "final", [out / "final"]
        parameters = gathered_parameters(model, keep=env.is_main)
        if env.is_main:
            failure = attempt_write(lambda: _save_final(model, path, parameters, tokenizer, template, processor))
        for _ in parameters:  # the all-gathers rank 0's writer consumed (all of them, unless its write failed)
            pass
        if lora is not None:
            from ..model.peft import save_peft_adapter

            trained = {unwrapped_name(n): _full(p).detach().cpu()
                       for n, p in model.named_parameters() if p.requires_grad}
            written.append(out / "adapter")
            if env.is_main and failure is None:
                failure = attempt_write(
                    lambda: save_peft_adapter(model.config, out / "adapter", trained, lora, base_model=base_model,
                                              carried=model.carried))
    failed = gather_failures(failure)
    if failed:
        if env.is_main:  # a half-written export must not pass for a whole one
            for p in written:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        tensors = model.projector.parameters() if stage == "align" else [*model.parameters(), *model.carried.values()]
        needed = sum(t.numel() * t.element_size() for t in tensors)  # a DTensor counts its full shape
        raise ExportWriteError(
            f"export to {path} failed: {failures_text(failed, needed, out)}. What it had written is removed. "
            "Free space (or choose another train.output_dir) and run the same command again: it resumes "
            "from the newest complete checkpoint (checkpoint.resume=auto; with checkpoint.save_final=true "
            "that is the last step, and the run only exports).")
    barrier()
    return path


def _save_final(model, path: Path, parameters, tokenizer, template: str | None, processor) -> None:
    model.save_pretrained(path, state=parameters)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    if processor is not None:
        for name, content in processor_files(processor, model.config).items():
            (path / name).write_text(json.dumps(content, indent=2) + "\n")
    if template is not None:
        (path / RUN_FILE).write_text(json.dumps({"template": template}, indent=2) + "\n")


def processor_files(processor, config) -> dict[str, dict]:
    """{file name: JSON} of the transformers processor that preprocesses as `processor` (data.images.Preprocess,
    the tower's) for a model of LlavaConfig `config`. AnyRes: LlavaNextImageProcessor around the per-tile steps
    at the model's pinpoints, and the LlavaNextProcessor's own settings (transformers counts each image's
    tokens with them: patch size, the CLS that the "default" feature select drops)."""
    hf = processor.to_hf()
    if config.anyres is None:
        return {PREPROCESSOR_FILE: hf}
    return {PREPROCESSOR_FILE: {**hf, "image_processor_type": "LlavaNextImageProcessor", "do_pad": True,
                                "image_grid_pinpoints": [list(p) for p in config.anyres.pinpoints]},
            PROCESSOR_FILE: {"processor_class": "LlavaNextProcessor", "image_token": IMAGE_TAG,
                             "patch_size": config.vision.patch_size, "vision_feature_select_strategy": "default",
                             "num_additional_image_tokens": int(config.vision.model_type == "clip_vision_model")}}
