"""Llava: CLIP vision tower -> projector -> LLaMA decoder, natively on a PackedBatch.

Shape legend: T packed tokens, D LLM width, V vocabulary, N images (AnyRes: tiles), P image tokens per image
(AnyRes: per tile), C vision width, F placeholder positions of the pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..batch import IGNORE_INDEX, PackedBatch
from ..layers import Projector
from ..ops import fused_linear_cross_entropy, merge_visual_tokens
from .config import Backends, LlavaConfig
from .init import init_image_newline_, init_projector_, init_transformer_
from .llama import LlamaDecoder
from .vision import VisionTower


@dataclass
class LlavaOutput:
    """What Llava.forward returns (see its docstring)."""

    logits: torch.Tensor | None  # (T, V) fp32 over the expanded sequence, when asked for
    loss_sum: torch.Tensor | None  # () fp32: SUM of next-token cross-entropies over label tokens
    num_label_tokens: torch.Tensor  # () int64, on the batch's device (no host sync)


class Llava(nn.Module):
    """LLaVA on packed sequences. `config` is the architecture (what a checkpoint's config.json holds);
    `backends` picks the implementation of each op (default: Triton kernels on CUDA, torch elsewhere)."""

    def __init__(self, config: LlavaConfig, backends: Backends | None = None):
        super().__init__()
        self.config = config
        self.backends = backends or Backends()
        self.vision_tower = VisionTower(config)
        self.projector = Projector(
            config.vision.hidden_size, config.text.hidden_size, config.projector_depth, backend=self.backends.projector
        )
        self.language_model = LlamaDecoder(config.text, self.backends.attention)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if config.anyres is not None:
            # AnyRes (LLaVA-NeXT's spatial_unpad): ends every row of an image's tile features
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        # Checkpoint tensors the forward never uses (vision layers after the selected one, CLIP's
        # post_layernorm), keyed by their llava-hf name: kept as they are so an export is complete.
        self.carried: dict[str, torch.Tensor] = {}

    @property
    def num_image_tokens(self) -> int:
        """Positions one image occupies in the LLM's sequence; AnyRes: the features of one tile (an image's count
        depends on its size: config.anyres.num_tokens)."""
        return self.config.num_image_tokens

    # --- forward -------------------------------------------------------------------------------

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(T, D) input embeddings: text rows of the table, projected image features at placeholders."""
        embed_weight = self.language_model.embed_tokens.weight
        if batch.num_images:
            # Only images run through CLIP: text-only samples cost no vision compute. AnyRes: every tile of
            # the pack in one call.
            feats_NPC = self.vision_tower(batch.pixel_values)
            feats = self.projector(feats_NPC.reshape(-1, feats_NPC.shape[-1]))
            if batch.feature_index is not None:
                # Base features, the unpadded grid and a newline per row, for every image at once: one gather
                # at the host-built index (the newline is the row after the last tile's features).
                rows = torch.cat([feats, self.image_newline[None].to(feats.dtype)])
                feats = rows.index_select(0, batch.feature_index)  # (F, D)
        else:
            feats = embed_weight.new_zeros(0, embed_weight.shape[1])
        return merge_visual_tokens(
            batch.input_ids, embed_weight, feats, batch.image_token_id, backend=self.backends.merge
        )

    def forward(self, batch: PackedBatch, *, return_logits: bool = False, compute_loss: bool = True) -> LlavaOutput:
        """Run the model on a pack of T tokens holding B samples and N images.

        batch: a PackedBatch (fastllava/batch.py) whose images are expanded to `self.num_image_tokens`
          placeholders each; labels unshifted (the shift happens here, inside each sample).
        return_logits: False (training): the loss comes from the fused LM head + cross-entropy, and the
          (T, V) logits never exist. True (evaluation, generation, tests): the LM head runs on every
          position and the (T, V) logits are returned in fp32; the loss, if asked for, is computed from
          them.
        compute_loss: False skips the loss (then `loss_sum` is None).

        Returns LlavaOutput: logits (T, V) fp32 or None; loss_sum () fp32, the SUM of next-token
        cross-entropies over label tokens (divide by a label count of your choosing: the trainer uses the
        whole optimizer step's); num_label_tokens () int64 on the batch's device.
        """
        if batch.num_images and batch.num_image_tokens != self.num_image_tokens:
            raise ValueError(
                f"batch expands each image to {batch.num_image_tokens} tokens but the model makes {self.num_image_tokens}"
            )
        if batch.num_images and batch.anyres != self.config.anyres:
            raise ValueError(f"batch's images were laid out for AnyRes grid {batch.anyres} but the model's is "
                             f"{self.config.anyres} (None: fixed resolution); build the batch with "
                             "PackedBatch.from_samples(..., anyres=model.config.anyres)")
        hidden_TD = self.language_model(self.embed(batch), batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        targets = batch.shifted_labels()
        num_label_tokens = (targets != IGNORE_INDEX).sum()
        logits = loss_sum = None
        if return_logits:
            logits = self.lm_head(hidden_TD).float()
            if compute_loss:
                loss_sum = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        elif compute_loss:
            loss_sum = fused_linear_cross_entropy(
                hidden_TD, self.lm_head.weight, targets, reduction="sum", backend=self.backends.loss
            )
        return LlavaOutput(logits=logits, loss_sum=loss_sum, num_label_tokens=num_label_tokens)

    def generate(self, prompts: list[dict], *, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: list[list[int]] | None = None,
                 max_batch_size: int = 64, prefill_tokens: int = 8192) -> list[list[int]]:
        """Generated token ids after each prompt, in input order (fastllava.generate.Generator).

        prompts: dicts {"input_ids": list[int] with ONE image token per image, "pixel_values": (n_images,
          3, S, S) tensor or None}; AnyRes: each image's tiles, and "image_sizes" (Generator.stream). A sequence
          ends after `eos_token_id` (not included), after one of the `stop` id sequences (not included) or at
          max_new_tokens. temperature 0 is greedy, otherwise
          nucleus sampling (top_p) from a per-prompt generator seeded by (seed, prompt index).
        max_batch_size: sequences decoded together; prefill_tokens: token budget of one packed prefill.
        """
        from ..generate import Generator

        return Generator(self, max_batch_size=max_batch_size, prefill_tokens=prefill_tokens).generate(
            prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LlavaConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    backends: Backends | None = None) -> "Llava":
        """A randomly initialized model (training from scratch, tests), by the rules of model/init.py."""
        model = cls(config, backends).to(dtype)
        model.init_weights(seed)
        return model

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic initialization of every tensor, including the carried unused vision layers."""
        from .hf import unused_vision_tensors  # the carried tensors are named in the checkpoint's terms

        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        init_transformer_(self.vision_tower, gen)
        init_transformer_(self.language_model, gen)
        init_projector_(self.projector.linears, gen)
        if self.config.anyres is not None:
            init_image_newline_(self.image_newline, gen)
        if not self.config.text.tie_word_embeddings:
            init_transformer_(self.lm_head, gen)
        self.carried = unused_vision_tensors(self.config, gen, dtype=self.lm_head.weight.dtype, device=device)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Llava":
        """Load a llava-hf `LlavaForConditionalGeneration` directory or an original-LLaVA directory, or the Hub
        id of one (`org/name[@revision]`: model/hub.py).

        kwargs: dtype (default: as stored), device, backends (a Backends), vision_tower (CLIP directory for
        the original layout when config.json's path is not local), and LlavaConfig field overrides.
        """
        from .hf import load_llava

        return load_llava(cls, Path(path), **kwargs)

    @classmethod
    def from_components(cls, vision: str | Path, llm: str | Path, projector_weights: str | Path | None = None,
                        **kwargs) -> "Llava":
        """The stage-1 starting point: a CLIP directory, a LLaMA directory (either may be a Hub id: model/hub.py),
        a new projector (seeded by `seed`, nn.Linear's default initialization as LLaVA's) or the stage-1 one
        from `projector_weights`.

        kwargs: dtype, device, seed, backends, and LlavaConfig fields the two checkpoints do not hold:
        projector_type (default "mlp2x_gelu"), vision_feature_layer (-2), vision_feature_select ("patch"),
        image_token_id (default: the first id after the LLM's vocabulary, for an added <image>).
        """
        from .hf import load_components

        return load_components(cls, Path(vision), Path(llm), projector_weights, **kwargs)

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 5 * 2**30, state=None) -> None:
        """Write the llava-hf layout (config.json, safetensors shards + index) that transformers loads, for
        an mlp2x_gelu projector; any other projector (the first LLaVA's linear one, which transformers'
        LlavaForConditionalGeneration cannot hold) in the original LLaVA layout: LlavaLlamaForCausalLM
        config.json with mm_projector_type, `model.mm_projector.*` keys, the vision tower in
        `path/vision_tower/` (a CLIPVisionModel directory). `from_pretrained` reads both.

        state: (parameter name, full tensor) pairs, written as they come (e.g. gathered from FSDP shards one
        at a time, so the writer never holds the model); default the module's own parameters.
        """
        from .hf import save_llava

        save_llava(self, Path(path), max_shard_bytes=max_shard_bytes, state=state)

    def save_components(self, vision_dir: str | Path, llm_dir: str | Path) -> None:
        """The vision tower as a CLIPVisionModel directory and the LLM (decoder + LM head) as a
        LlamaForCausalLM directory, which transformers and `Llava.from_components` load."""
        from .hf import save_components

        save_components(self, Path(vision_dir), Path(llm_dir))

    def save_projector(self, path: str | Path) -> None:
        """The projector alone, as safetensors with LLaVA's `mm_projector.*` key names (stage-1 output)."""
        from .hf import save_projector

        save_projector(self, Path(path))

    def load_projector(self, path: str | Path) -> None:
        """Load a stage-1 projector: LLaVA's mm_projector.bin or our safetensors."""
        from .hf import load_projector

        load_projector(self, Path(path))

    @torch.no_grad()
    def resize_token_embeddings(self, num_tokens: int, *, pad_to_multiple_of: int = 64) -> int:
        """Grow the vocabulary to hold added tokens (`<image>`, a pad token); returns the new size.

        The size is padded up to a multiple of 64 as the llava-hf conversion does (tensor-core friendly
        shapes). New rows of the embedding and of the LM head are set to the mean of the existing rows,
        as LLaVA's own training code does: the model starts out treating new tokens as an average token.
        """
        old = self.config.text.vocab_size
        new = -(-num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new <= old:
            return old
        embed = self.language_model.embed_tokens
        grown = torch.cat([embed.weight, embed.weight.mean(0, keepdim=True).expand(new - old, -1)])
        embed.weight = nn.Parameter(grown, requires_grad=embed.weight.requires_grad)
        embed.num_embeddings = new
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = embed.weight
        else:
            head = self.lm_head.weight
            grown = torch.cat([head, head.mean(0, keepdim=True).expand(new - old, -1)])
            self.lm_head.weight = nn.Parameter(grown, requires_grad=head.requires_grad)
        self.lm_head.out_features = new
        self.config.text.vocab_size = new
        return new
