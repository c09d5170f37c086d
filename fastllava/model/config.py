"""The model's knobs, each defined and validated once: architecture (`LlavaConfig` and its parts) and the
op backends that run it (`Backends`).

The architecture is what a checkpoint's `config.json` holds (llava-hf `LlavaForConditionalGeneration`,
`CLIPVisionModel`, `LlamaForCausalLM` and the original LLaVA `LlavaLlamaForCausalLM`) and is read from and
written to those files here. Backends are how this process runs the ops; they never reach a checkpoint.
The training configuration (fastllava/config.py) embeds these dataclasses rather than repeating them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..anyres import DEFAULT_PINPOINTS, check_pinpoints
from ..batch import AnyResGrid

PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
FEATURE_SELECTS = ("patch", "cls_patch")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} {value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


@dataclass
class Backends:
    """Which implementation runs each op: "auto" (Triton on CUDA, the torch reference elsewhere) or one of
    the op's own backend names (fastllava.ops.<op>.BACKENDS)."""

    attention: str = "auto"
    projector: str = "auto"
    merge: str = "auto"
    loss: str = "auto"

    def __post_init__(self):
        from ..ops.fused_linear_cross_entropy import BACKENDS as LOSS
        from ..ops.fused_mlp_projector import BACKENDS as PROJECTOR
        from ..ops.merge_visual_tokens import BACKENDS as MERGE
        from ..ops.varlen_attention import BACKENDS as ATTENTION

        for name, allowed in (("attention", ATTENTION), ("projector", PROJECTOR), ("merge", MERGE), ("loss", LOSS)):
            _choice(f"{name} backend", getattr(self, name), ("auto",) + allowed)


# The tower layouts (model/vision.py): CLIP's has a CLS token, a pre-layernorm and a patch convolution without
# bias; SigLIP's (fixed-resolution SiglipVisionModel) has none of the first two and a bias on the convolution.
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


@dataclass
class VisionConfig:
    """The vision transformer (defaults: CLIP ViT-L/14 at 336 px), as CLIPVisionConfig / SiglipVisionConfig
    name their fields; `model_type` says which layout."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    model_type: str = "clip_vision_model"
    # SigLIP's pooling head (SiglipVisionConfig.vision_use_head): LLaVA never runs it, but a checkpoint with it
    # holds `head.*` tensors and one without it (PaliGemma's, Gemma 3's towers) none. None: transformers' default,
    # True for SigLIP; CLIP has no such head and leaves it None.
    vision_use_head: Optional[bool] = None

    def __post_init__(self):
        _choice("vision model_type", self.model_type, VISION_MODEL_TYPES)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        # Not a multiple is allowed: the stride-p convolution drops the last image_size % patch_size pixels, as
        # transformers does (siglip-so400m-patch14-384: 27 x 27 patches of 14 px cover 378 of the 384).
        if self.image_size < self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        _choice("vision hidden_act", self.hidden_act, ("quick_gelu", "gelu", "gelu_pytorch_tanh"))
        if self.vision_use_head is not None and self.has_class_token:
            raise ValueError(f"vision_use_head is SigLIP's pooling head; a {self.model_type} tower has none: leave it "
                             "unset (None)")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (CLS not counted): 729 for siglip-so400m-patch14-384, 576 for CLIP-L/14-336."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        """Whether the tower puts a CLS token before the patches (CLIP) or not (SigLIP)."""
        return self.model_type == "clip_vision_model"

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """From a CLIPVisionConfig or SiglipVisionConfig dict (unknown keys ignored)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def pooling_head(self) -> bool:
        """Whether the tower's checkpoints hold SigLIP's pooling head (`head.*` tensors)."""
        return not self.has_class_token and self.vision_use_head is not False

    def to_hf(self) -> dict:
        """A CLIPVisionConfig or SiglipVisionConfig dict (vision_use_head only where it is set)."""
        return {k: v for k, v in asdict(self).items() if not (k == "vision_use_head" and v is None)}


@dataclass
class TextConfig:
    """The decoder (defaults: LLaMA-2 / Vicuna 7B), as LlamaConfig names its fields. model_type is its family
    (model/families/: "llama", "qwen2", "qwen3", "mistral"), which its family's read_config sets with the fields
    where its block differs (qkv_bias, qk_norm); a config written by hand sets them together."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads (see attention_head_dim)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    model_type: str = "llama"
    qkv_bias: bool = False  # bias on the q/k/v projections, not on o_proj (Qwen2); implied by model_type in HF
    attention_bias: bool = False  # bias on q/k/v AND o_proj (LlamaConfig's and Qwen3Config's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3); implied by model_type in HF
    # Keys further back than this are masked (Mistral v0.1: 4096). Attention here always sees the whole sample,
    # which is the same thing for a sample no longer than the window: check_length refuses a longer one.
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            _choice("rope_scaling type", rope_type, ROPE_TYPES)
            self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
            self.rope_scaling.pop("type", None)
            if rope_type == "default":
                self.rope_scaling = None
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window}")

    def check_length(self, length: int, what: str) -> None:
        """ValueError unless a sequence of `length` tokens fits the sliding window (if any). `what` names the
        sequence ("the longest sample of the pack"). Host ints only: call it where the length is known."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(
                f"{what} has {length} tokens, more than the decoder's sliding_window of {self.sliding_window}: "
                "fastllava's attention sees the whole sample and does not mask keys beyond the window, so it "
                f"refuses sequences longer than {self.sliding_window} tokens (lower data.model_max_length, or "
                "the prompt + max_new_tokens of generation)")

    @property
    def attention_head_dim(self) -> int:
        """Width of one attention head. Derived here, never stored: a config built from defaults and then
        patched (YAML, overrides) must not keep the head width of the defaults."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, **fields: Any) -> "TextConfig":
        """From a LlamaConfig-shaped dict of transformers 4.x (rope_theta, rope_scaling) or 5.x
        (rope_parameters); its model_type is ignored: the family reading it (families/) passes model_type and
        the fields its block sets as `fields`."""
        d = {k: v for k, v in d.items() if k != "model_type"}
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x keeps them apart.
        rope = d.pop("rope_parameters", None)
        if rope:
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            d.setdefault("rope_scaling", rope if rope.get("rope_type", "default") != "default" else None)
        return cls(**{**{k: d[k] for k in cls.__dataclass_fields__ if k in d}, **fields})

    def to_hf(self) -> dict:
        """The config dict of its family's transformers class (LlamaConfig, Qwen2Config, ...) in transformers 5's
        form (rope_parameters); qkv_bias and qk_norm are not written: the model_type implies them."""
        d = asdict(self)
        model_type = d.pop("model_type")
        d.pop("qkv_bias")
        d.pop("qk_norm")
        d["head_dim"] = self.attention_head_dim
        rope = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
        if d["rope_scaling"]:
            rope.update(d["rope_scaling"])
        d.pop("rope_scaling")
        return {"model_type": model_type, "hidden_act": "silu", "rope_parameters": rope, **d}


@dataclass
class LlavaConfig:
    """CLIP vision tower + projector + LLaMA decoder, and how they connect. The defaults are LLaVA-1.5-7B's
    (CLIP ViT-L/14 at 336 px, features of the second-to-last layer without CLS, mlp2x_gelu, Vicuna-7B).
    With image_grid_pinpoints set it is LLaVA-NeXT's AnyRes (llava-hf LlavaNextForConditionalGeneration):
    each image is tiled at the best of those (height, width) resolutions, and the model has a learned
    image_newline ending every row of the tiles' features (batch.py's module docstring)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # "linear" (LLaVA) or "mlpNx_gelu", N >= 1
    vision_feature_layer: int = -2  # hidden state k of the tower: 0 = embeddings, -1 = last layer
    vision_feature_select: str = "patch"  # "patch" drops CLS (LLaVA's default), "cls_patch" keeps it
    image_token_id: int = 32000
    pad_token_id: Optional[int] = None
    # AnyRes (LLaVA-NeXT): the (height, width) resolutions in pixels, each a whole number of the tower's tiles
    # (LLaVA-NeXT's: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]); None: fixed resolution.
    image_grid_pinpoints: Optional[list[list[int]]] = None

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if not PROJECTOR_PATTERN.match(self.projector_type) or self.projector_type == "mlp0x_gelu":
            raise ValueError(f"projector_type must be 'linear' or 'mlpNx_gelu' (N >= 1), got {self.projector_type!r}")
        _choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        if self.vision_feature_select == "cls_patch" and not self.vision.has_class_token:
            raise ValueError(f"vision_feature_select 'cls_patch' needs a CLS token, which a {self.vision.model_type} "
                             "tower does not have: use 'patch' (every token of the tower is a patch)")
        n = self.vision.num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is out of range for {n} vision layers")
        if self.image_grid_pinpoints is not None:
            if self.vision_feature_select == "cls_patch":
                # transformers' LlavaNext lays each tile's features out as a side x side map: no room for a CLS
                raise ValueError("image_grid_pinpoints (AnyRes) needs vision_feature_select 'patch': a tile's "
                                 "features form a square map of patches, without the CLS token")
            # Their form here; that each is a whole number of tiles, where the tower is known (`anyres`, which
            # every model build reads): a run's model.architecture with model.source=components holds only the
            # connector fields, beside a stand-in 336 px tower that the checkpoint's replaces (model/hf.py
            # plan_components), so a SigLIP-384 LLaVA-NeXT's pinpoints cannot be checked against it.
            self.image_grid_pinpoints = [list(p) for p in check_pinpoints(self.image_grid_pinpoints, 1)]

    @property
    def anyres(self) -> Optional[AnyResGrid]:
        """The AnyRes grid (tiles, tokens and feature placement of an image: batch.AnyResGrid), None at fixed
        resolution. ValueError unless every pinpoint is a whole number of the tower's image_size tiles."""
        if self.image_grid_pinpoints is None:
            return None
        return AnyResGrid(tuple(map(tuple, self.image_grid_pinpoints)), self.vision.image_size,
                      self.vision.image_size // self.vision.patch_size)

    @property
    def num_vision_layers_run(self) -> int:
        """Encoder layers that are actually run: hidden state k is the output of layer k (0 = embeddings)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.num_hidden_layers + 1 + layer

    @property
    def num_image_tokens(self) -> int:
        """Positions one image occupies in the LLM's sequence (576 for ViT-L/14 at 336 px); with AnyRes the
        features of one tile (an image's count depends on its size: AnyResGrid.num_tokens)."""
        return self.vision.num_patches + (self.vision_feature_select == "cls_patch")

    @property
    def projector_depth(self) -> int:
        """Linear layers of the projector: 1 for linear, N for mlpNx_gelu."""
        m = PROJECTOR_PATTERN.match(self.projector_type)
        return 1 if m.group(1) == "linear" else int(m.group(2))

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf_llava(cls, d: dict, **overrides: Any) -> "LlavaConfig":
        """From a llava-hf `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` (model_type
        "llava_next": AnyRes at its image_grid_pinpoints) config.json dict."""
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act {d['projector_hidden_act']!r} is not supported (expected 'gelu')")
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one integer layer, got {layer!r}")
        from .families import find  # the families read their configs through this module

        vision = find("tower", d["vision_config"].get("model_type", "clip_vision_model"),
                      "vision_config").read_config(d["vision_config"])
        strategy = d.get("vision_feature_select_strategy", "default")
        # transformers' "default" drops the first token, "full" keeps all: a tower without CLS needs "full"
        selects = {"default": "patch", "full": "cls_patch"} if vision.has_class_token else {"full": "patch"}
        if strategy not in selects:
            raise ValueError(f"vision_feature_select_strategy must be {' or '.join(map(repr, selects))} for a "
                             f"{vision.model_type} tower, got {strategy!r}")
        text_config = d["text_config"]
        text = find("decoder", text_config.get("model_type", "llama"), "text_config").read_config(text_config)
        if "tie_word_embeddings" in d:
            text.tie_word_embeddings = d["tie_word_embeddings"]
        kwargs = dict(
            vision=vision,
            text=text,
            projector_type="mlp2x_gelu",
            vision_feature_layer=layer,
            vision_feature_select=selects[strategy],
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            pad_token_id=d.get("pad_token_id", d["text_config"].get("pad_token_id")),
        )
        if d.get("model_type") == "llava_next":
            # transformers' LlavaNextConfig default when the file leaves it out
            kwargs["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or [list(p) for p in DEFAULT_PINPOINTS]
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_llava(self) -> dict:
        """A llava-hf LlavaForConditionalGeneration config.json dict (mlp2x_gelu projectors only); with AnyRes a
        LlavaNextForConditionalGeneration one."""
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(
                f"the llava-hf layout only holds an mlp2x_gelu projector (transformers' LlavaMultiModalProjector); "
                f"this model has {self.projector_type!r}: write it in the original LLaVA layout "
                "(to_original_llava; Llava.save_pretrained does so for every other projector)"
            )
        text = self.text.to_hf()
        text["pad_token_id"] = self.pad_token_id
        kind = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}
        if self.anyres is not None:
            kind = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                    "image_grid_pinpoints": self.image_grid_pinpoints}
        return {
            **kind,
            "vision_config": self.vision.to_hf(),
            "text_config": text,
            "image_token_index": self.image_token_id,
            "image_seq_length": self.num_image_tokens,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self._feature_select_strategy(),
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }

    def _feature_select_strategy(self) -> str:
        """transformers' name of the selection: "default" drops the first token (the CLS), "full" keeps all."""
        return "default" if self.vision_feature_select == "patch" and self.vision.has_class_token else "full"

    def to_original_llava(self, vision_tower: str) -> dict:
        """An original LLaVA `LlavaLlamaForCausalLM` config.json dict (haotian-liu/LLaVA llava_llama.py): the
        LlamaConfig fields flat, in transformers 4.x's form (rope_theta, rope_scaling) as LLaVA's code reads
        them, and the mm_* fields of its model arguments. Holds any projector (mm_projector_type "linear" or
        "mlpNx_gelu"). vision_tower: what mm_vision_tower names, a CLIP directory (LLaVA: a hub id or a path).
        image_token_index records our <image> id; LLaVA itself uses IMAGE_TOKEN_INDEX -200 in place of it."""
        if self.text.model_type != "llama":
            raise ValueError(f"the original LLaVA layout holds a LLaMA decoder (LlavaLlamaForCausalLM); this model's "
                             f"is {self.text.model_type!r}: write it in the llava-hf layout (an mlp2x_gelu projector)")
        text = self.text.to_hf()
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope.pop("rope_theta")
        # transformers 4.31 (LLaVA's pin) reads the scaling kind from "type"; later ones from "rope_type"
        text["rope_scaling"] = None if rope["rope_type"] == "default" else {"type": rope["rope_type"], **rope}
        return {
            **text,
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "pad_token_id": self.pad_token_id,
            "mm_vision_tower": vision_tower,
            "mm_hidden_size": self.vision.hidden_size,
            "mm_projector_type": self.projector_type,
            "mm_vision_select_layer": self.vision_feature_layer,
            "mm_vision_select_feature": self.vision_feature_select,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "use_mm_proj": True,
            "image_token_index": self.image_token_id,
            **self._original_anyres(),
        }

    def _original_anyres(self) -> dict:
        """LLaVA-NeXT's fields of AnyRes (llava_arch.py, mm_utils.py), which reads each pinpoint as (width,
        height): written transposed, so that its code picks the same grid for every image."""
        if self.anyres is None:
            return {}
        return {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [[w, h] for h, w in self.image_grid_pinpoints]}

    @staticmethod
    def original_anyres_fields(raw: dict, where: str) -> dict:
        """{"image_grid_pinpoints": [[h, w], ...]} of an original LLaVA(-NeXT) config.json with AnyRes ({} for
        LLaVA-1.5's "pad" or "square"); ValueError for the merge types fastllava does not implement."""
        aspect = raw.get("image_aspect_ratio") or "pad"
        if aspect != "anyres":
            if aspect.startswith("anyres"):
                raise ValueError(f"{where}: image_aspect_ratio {aspect!r} is not supported (only 'anyres')")
            return {}
        merge = raw.get("mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise ValueError(f"{where}: mm_patch_merge_type {merge!r} with anyres is not supported; fastllava "
                             "implements 'spatial_unpad' (unpadded grid, image_newline after each row)")
        pinpoints = raw.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list):
            raise ValueError(f"{where}: image_grid_pinpoints must be a list of [width, height] pairs, got "
                             f"{pinpoints!r}")
        return {"image_grid_pinpoints": [[p[1], p[0]] if isinstance(p, list) and len(p) == 2 else p
                                         for p in pinpoints]}
