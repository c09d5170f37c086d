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
        shifted[:-1] = self.labels[1:]
        last = self.cu_seqlens[1:].long() - 1
        shifted[last[last >= 0]] = IGNORE_INDEX
        return shifted

    def num_label_tokens(self) -> int:
        """Tokens that carry a loss (after the in-sample shift)."""
        return int((self.shifted_labels() != IGNORE_INDEX).sum())

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
        return cls(
            input_ids=torch.cat(ids_out),
            labels=torch.cat(labels_out),
            position_ids=torch.cat(pos_out),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
            pixel_values=torch.cat(images) if images else None,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
        )
