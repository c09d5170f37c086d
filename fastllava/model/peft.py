"""LoRA adapters in PEFT's on-disk format, for transformers' LlavaForConditionalGeneration (and
LlavaNextForConditionalGeneration, whose modules have the same names).

`adapter_config.json` + `adapter_model.safetensors` as `peft.PeftModel.save_pretrained` writes them for a
LlavaForConditionalGeneration (transformers 5 module names), so

    base = LlavaForConditionalGeneration.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)

gives the fine-tuned model. Keys: `base_model.model.<module>.lora_A.weight` / `lora_B.weight` for each
adapted layer, and the projector, trained in full, in `modules_to_save` as
`base_model.model.model.multi_modal_projector.linear_{1,2}.{weight,bias}`; a vision tower trained in full
beside the adapters (train.unfreeze_vision) is there too, whole, as `base_model.model.model.vision_tower.*`
(PEFT's own way to carry fully trained modules; LLaVA-NeXT writes the same weights to non_lora_trainables.bin).
An AnyRes model's image_newline, which trains with the projector, is a bare parameter that modules_to_save
cannot name: it is stored under its own key, `base_model.model.model.image_newline`, which PEFT's
set_peft_model_state_dict loads into the model as it loads every key that is not an adapter's.
Only the mlp2x_gelu projector has a place in LlavaForConditionalGeneration; other projectors get the merged
export alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .keys import LLM, NEWLINE, VISION, to_checkpoint_key
from .stacked import stack_adapters

_PREFIX = "base_model.model."
_PROJECTOR = "multi_modal_projector"
_TOWER = "vision_tower"


def transformers_module_name(name: str, config) -> str:
    """Our parameter name -> LlavaForConditionalGeneration's (transformers 5) name of the same tensor."""
    return _transformers_name(to_checkpoint_key(name, config))


def _transformers_name(key: str) -> str:
    """Canonical llava-hf key (the file layout: transformers 4 module names) -> transformers 5's name."""
    if key.startswith(LLM):
        return "model.language_model." + key[len(LLM):]
    if key.startswith(VISION):  # transformers 5's towers leave out the files' `vision_model.` (families/clip.py)
        return f"model.{_TOWER}." + key[len(VISION):]
    if key.startswith(_PROJECTOR + ".") or key == NEWLINE:
        return "model." + key
    return key


def save_peft_adapter(config, path: Path, trained: dict[str, torch.Tensor], lora, *,
                      base_model: str | None = None, carried: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapters, the projector and (if it trained) the vision tower of `trained` (our name -> full
    tensor: the trainable parameters of a LoRA run) as a PEFT LoRA adapter. lora: the run's LoRAConfig.
    base_model: recorded as base_model_name_or_path (the checkpoint the adapters apply to). carried: the
    model's tensors that the forward never uses (Llava.carried, canonical keys): PEFT replaces a module of
    modules_to_save whole, so a trained tower's unused layers and norms come too, as they were."""
    if config.projector_type != "mlp2x_gelu":
        raise ValueError(f"a PEFT adapter for LlavaForConditionalGeneration needs an mlp2x_gelu projector, not "
                         f"{config.projector_type!r}; use the merged export")
    tensors, adapters = {}, {}
    for name, t in trained.items():
        if name.endswith((".lora_a", ".lora_b")):
            module, kind = name.rsplit(".", 1)
            adapters.setdefault(to_checkpoint_key(module + ".weight", config), [None, None])[kind == "lora_b"] = t
        elif name.startswith(("projector.", _TOWER + ".")) or name == NEWLINE:
            tensors[_PREFIX + transformers_module_name(name, config)] = t
        else:
            raise ValueError(f"{name}: trainable in a LoRA run but neither an adapter, the projector, "
                             "image_newline nor the vision tower")
    if any(n.startswith(_TOWER + ".") for n in trained):
        for key, t in (carried or {}).items():
            if key.startswith(VISION):
                tensors[_PREFIX + _transformers_name(key)] = t
    # A family that stores q/k/v (or gate/up) as one Linear (Phi-3's qkv_proj) is adapted there by PEFT: one
    # adapter of rank n r and alpha n alpha per stacked Linear, equal to our n adapters (model/stacked.py).
    adapters, joined = stack_adapters(adapters, config)
    for key, (a, b) in adapters.items():
        module = _transformers_name(key).removesuffix(".weight")
        tensors[f"{_PREFIX}{module}.lora_A.weight"], tensors[f"{_PREFIX}{module}.lora_B.weight"] = a, b
    stacked = {key.rsplit(".", 2)[-2]: n for key, n in joined.items()}  # qkv_proj: 3, gate_up_proj: 2
    targets = [*lora.targets, *sorted(stacked)]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # The decoder's layers only (a regex: PEFT's suffix lists would also match the vision tower's).
        "target_modules": rf".*language_model.*\.({'|'.join(targets)})",
        "rank_pattern": {name: n * lora.rank for name, n in stacked.items()},
        "alpha_pattern": {name: n * lora.alpha for name, n in stacked.items()},
        "modules_to_save": [_PROJECTOR] + ([_TOWER] if any(n.startswith(_TOWER + ".") for n in trained) else []),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
