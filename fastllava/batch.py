"""PackedBatch: the one data contract between the loader, the model and the kernels.

Samples sit back to back in one flat sequence of T tokens, in the flash-attention "varlen" layout:
sample b owns positions cu_seqlens[b] : cu_seqlens[b + 1]. Every image of a sample is expanded to
`num_image_tokens` consecutive placeholder positions holding `image_token_id`; the model writes the
projected image features there, images taken in order of appearance from `pixel_values`.

Labels are NOT shifted: labels[t] is the token at t (or IGNORE_INDEX). The model predicts
labels[t + 1] from position t only while t + 1 is in the same sample (`shifted_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Samples back to back in one sequence of T tokens (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # (T,) int64; images expanded to num_image_tokens placeholders each
    labels: torch.Tensor  # (T,) int64; IGNORE_INDEX where no loss; not shifted
    position_ids: torch.Tensor  # (T,) int64; restart at 0 for every sample
    cu_seqlens: torch.Tensor  # (B + 1,) int32; cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int  # longest sample of the pack
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W), in order of appearance; None without images
    image_token_id: int
    num_image_tokens: int  # placeholder positions per image

    @property
    def num_tokens(self) -> int:
        """T, every sample's tokens with images expanded."""
        return self.input_ids.numel()

    @property
    def num_samples(self) -> int:
        """B, the samples of the pack."""
        return self.cu_seqlens.numel() - 1

    @property
    def num_images(self) -> int:
        """Images of the pack (rows of pixel_values)."""
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    def image_mask(self) -> torch.Tensor:
        """(T,) bool: the placeholder positions, which receive image features."""
        return self.input_ids == self.image_token_id

    def shifted_labels(self) -> torch.Tensor:
        """(T,) int64: the target of position t, i.e. labels[t + 1] inside the sample, IGNORE_INDEX at
        each sample's last position so that no prediction crosses a sample boundary."""
        shifted = torch.full_like(self.labels, IGNORE_INDEX)
        if shifted.numel() == 0:
            return shifted
        shifted[:-1] = self.labels[1:]
        # An empty sample's "last position" is the previous sample's (ignored anyway), or -1 for an empty
        # first sample, which wraps to T - 1, the pack's last position (ignored anyway). No boolean mask:
        # this runs inside the model's forward, where a data-dependent shape would be a host sync.
        last = (self.cu_seqlens[1:].long() - 1) % shifted.numel()
        return shifted.index_fill_(0, last, IGNORE_INDEX)

    def num_label_tokens(self) -> int:
        """Tokens that carry a loss (after the in-sample shift). Reads values: call it on the host-side
        batch (the loader's CPU tensors), not on a device batch inside a step."""
        return int((self.shifted_labels() != IGNORE_INDEX).sum())

    def check(self, vocab_size: int | None = None) -> None:
        """Raise ValueError unless the pack holds the invariants the model's ops rely on without checking
        them in the forward (no host reads there): cu_seqlens from 0 to T, non-decreasing, max_seqlen its
        longest sample, positions restarting at 0 in every sample, num_image_tokens placeholders per image,
        and, given vocab_size, token ids and labels inside the vocabulary. Host-side: reads every value."""
        T = self.num_tokens
        if self.labels.shape != (T,) or self.position_ids.shape != (T,):
            raise ValueError(f"PackedBatch: input_ids, labels and position_ids must all be ({T},), got "
                             f"{tuple(self.labels.shape)} and {tuple(self.position_ids.shape)}")
        bounds = self.cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if not bounds or bounds[0] != 0 or bounds[-1] != T or min(lengths, default=0) < 0:
            raise ValueError(f"PackedBatch: cu_seqlens must rise from 0 to T={T}, got {bounds}")
        if self.max_seqlen != max(lengths, default=0):
            raise ValueError(f"PackedBatch: max_seqlen={self.max_seqlen} but the longest sample has "
                             f"{max(lengths, default=0)} tokens")
        starts = torch.repeat_interleave(self.cu_seqlens[:-1].long(), torch.tensor(lengths), output_size=T)
        if not torch.equal(self.position_ids, torch.arange(T) - starts):
            raise ValueError("PackedBatch: position_ids must restart at 0 in every sample")
        placeholders = int(self.image_mask().sum())
        if placeholders != self.num_images * self.num_image_tokens:
            raise ValueError(f"PackedBatch: {placeholders} image placeholders but {self.num_images} images of "
                             f"{self.num_image_tokens} tokens")
        if vocab_size is not None:
            text = self.input_ids[~self.image_mask()]
            if text.numel() and not (0 <= int(text.min()) and int(text.max()) < vocab_size):
                raise ValueError(f"PackedBatch: token ids must lie in [0, {vocab_size})")
            labels = self.labels[self.labels != IGNORE_INDEX]
            if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab_size):
                raise ValueError(f"PackedBatch: labels must lie in [0, {vocab_size}) or be {IGNORE_INDEX}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The same pack with every tensor on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)

    def pin_memory(self) -> "PackedBatch":
        """Called by DataLoader(pin_memory=True) so host-to-device copies can overlap compute."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if torch.is_tensor(value) else value
        return PackedBatch(**pinned)

    @classmethod
    def from_samples(
        cls, samples: Sequence[dict], *, image_token_id: int, num_image_tokens: int
    ) -> "PackedBatch":
        """Pack tokenized samples into one sequence.

        samples: dicts with
          input_ids    (L,) int64 with ONE `image_token_id` per image,
          labels       (L,) int64, IGNORE_INDEX where no loss (the image token's label is ignored),
          pixel_values (n_images, 3, H, W) or None, one image per image token, in order.
        """
        if not samples:
            raise ValueError("PackedBatch.from_samples: got no samples")
        ids_out, labels_out, pos_out, images = [], [], [], []
        lengths = []
        for i, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(sample["labels"], dtype=torch.long)
            if ids.dim() != 1 or labels.shape != ids.shape:
                raise ValueError(
                    f"sample {i}: input_ids and labels must be 1-D of equal length, "
                    f"got {tuple(ids.shape)} and {tuple(labels.shape)}"
                )
            is_image = ids == image_token_id
            n_tags = int(is_image.sum())
            pixels = sample.get("pixel_values")
            n_pixels = 0 if pixels is None else pixels.shape[0]
            if n_tags != n_pixels:
                raise ValueError(
                    f"sample {i}: {n_tags} image tokens (id {image_token_id}) but {n_pixels} images in pixel_values"
                )
            # Each image token becomes num_image_tokens placeholders; label and position follow.
            repeats = torch.where(is_image, num_image_tokens, 1)
            ids = ids.repeat_interleave(repeats)
            labels = labels.repeat_interleave(repeats)
            labels[ids == image_token_id] = IGNORE_INDEX
            ids_out.append(ids)
            labels_out.append(labels)
            pos_out.append(torch.arange(ids.numel(), dtype=torch.long))
            lengths.append(ids.numel())
            if n_pixels:
                images.append(pixels)
        cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
        batch = cls(
            input_ids=torch.cat(ids_out),
            labels=torch.cat(labels_out),
            position_ids=torch.cat(pos_out),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
            pixel_values=torch.cat(images) if images else None,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
        )
        # Once, here, on the host: the model's forward trusts these invariants (docs/kernels.md, "No host
        # reads inside a micro-step").
        batch.check()
        return batch
