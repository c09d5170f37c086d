"""PackedBatch: the one data contract between the loader, the model and the kernels.

Samples sit back to back in one flat sequence of T tokens, in the flash-attention "varlen" layout:
sample b owns positions cu_seqlens[b] : cu_seqlens[b + 1]. Every image of a sample is expanded to
consecutive placeholder positions holding `image_token_id`; the model writes the projected image features
there, images taken in order of appearance.

Fixed resolution (LLaVA-1.5): every image is one row of `pixel_values` and `num_image_tokens` placeholders.

AnyRes (LLaVA-NeXT, `anyres` set): image k of size image_sizes[k] = (h, w) pixels is image_tile_counts[k]
rows of `pixel_values` (its downscaled whole image first, then its grid's tiles row-major, as
transformers' LlavaNextImageProcessor orders them) and image_token_counts[k] placeholders: the base
image's side * side features, then the tiles' features arranged as one (rows * side, cols * side) map,
cut to the image's aspect ratio, each row followed by the model's learned image_newline. Both counts
depend only on (h, w) and the model's grid (fastllava/anyres.py), so they are host ints computed here,
when the batch is built, and so is `feature_index`: for each placeholder in order, the row of
[every tile's features in pixel_values order (side * side rows per tile); image_newline] it receives. The
forward is one tower call over all tiles, the projector, one gather at `feature_index` and the merge:
no per-image loop and no host read of a device value.

Labels are NOT shifted: labels[t] is the token at t (or IGNORE_INDEX). The model predicts
labels[t + 1] from position t only while t + 1 is in the same sample (`shifted_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from . import anyres as geometry

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AnyResGrid:
    """How an AnyRes model (LLaVA-NeXT, spatial_unpad) turns an image of (h, w) pixels into tower inputs
    and visual tokens: the grid pinpoints (height, width) pairs, `tile` the tower's image size in pixels,
    `side` feature rows (and columns) one tile yields. Made by LlavaConfig.anyres; the geometry itself is
    fastllava/anyres.py's."""

    pinpoints: tuple[tuple[int, int], ...]
    tile: int
    side: int

    def __post_init__(self):
        object.__setattr__(self, "pinpoints", geometry.check_pinpoints(self.pinpoints, self.tile))

    def num_tiles(self, size_hw) -> int:
        """Rows of pixel_values for one image: its base image and its grid's tiles."""
        return geometry.num_tiles(size_hw, self.pinpoints, self.tile)

    def num_tokens(self, size_hw) -> int:
        """Placeholder positions of one image."""
        return geometry.num_image_tokens(size_hw, self.pinpoints, self.tile, self.side)

    def feature_rows(self, size_hw, first: int) -> torch.Tensor:
        """(num_tokens(size_hw),) int64: for each of the image's tokens, the row of the pack's tile features
        it takes, the image's base tile being feature rows first : first + side * side; -1 where the
        image_newline goes (pack_image_features in transformers' modeling_llava_next.py)."""
        s = self.side
        rows, cols = geometry.grid_shape(size_hw, self.pinpoints, self.tile)
        h, w = geometry.unpadded_shape(size_hw, rows * s, cols * s)
        # Coordinates of the kept (h, w) window on the (rows * s, cols * s) map: unpad_image cuts equally
        # from both ends.
        y_H1 = ((rows * s - h) // 2 + torch.arange(h))[:, None]
        x_1W = ((cols * s - w) // 2 + torch.arange(w))[None, :]
        tile_HW = 1 + (y_H1 // s) * cols + x_1W // s  # tile 0 is the base image
        grid_HW = first + tile_HW * (s * s) + (y_H1 % s) * s + x_1W % s
        newline_H1 = torch.full((h, 1), -1, dtype=torch.long)
        return torch.cat([first + torch.arange(s * s), torch.cat([grid_HW, newline_H1], 1).flatten()])


@dataclass
class PackedBatch:
    """Samples back to back in one sequence of T tokens (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # (T,) int64; images expanded to num_image_tokens placeholders each
    labels: torch.Tensor  # (T,) int64; IGNORE_INDEX where no loss; not shifted
    position_ids: torch.Tensor  # (T,) int64; restart at 0 for every sample
    cu_seqlens: torch.Tensor  # (B + 1,) int32; cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int  # longest sample of the pack
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W), in order of appearance; None without images;
    #   AnyRes: (n_tiles, 3, S, S), each image's tiles in turn (base image first)
    image_token_id: int
    num_image_tokens: int  # placeholder positions per image; AnyRes: features per tile (side * side)
    # AnyRes only (None for fixed resolution), host-side, one entry per image in order of appearance:
    anyres: AnyResGrid | None = None  # the grid the counts below were computed for
    image_sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) of each image in pixels
    image_tile_counts: tuple[int, ...] | None = None  # rows of pixel_values per image
    image_token_counts: tuple[int, ...] | None = None  # placeholder positions per image
    # (sum(image_token_counts),) int64: the row of cat([tile features (n_tiles * side * side, D), image_newline
    # (1, D)]) each placeholder receives, in placeholder order (see the module docstring)
    feature_index: torch.Tensor | None = None

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
        """Images of the pack (rows of pixel_values at fixed resolution)."""
        if self.anyres is not None:
            return len(self.image_sizes)
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def num_tiles(self) -> int:
        """Images the vision tower encodes: rows of pixel_values (an AnyRes image is its base image and tiles)."""
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def num_image_features(self) -> int:
        """Placeholder positions of all images of the pack."""
        if self.anyres is not None:
            return sum(self.image_token_counts)
        return self.num_images * self.num_image_tokens

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
        if self.anyres is not None:
            self._check_anyres()
        placeholders = int(self.image_mask().sum())
        if placeholders != self.num_image_features:
            per_image = (f"{self.num_image_tokens} tokens" if self.anyres is None
                         else f"{list(self.image_token_counts)} tokens")
            raise ValueError(f"PackedBatch: {placeholders} image placeholders but {self.num_images} images of "
                             f"{per_image}")
        if vocab_size is not None:
            text = self.input_ids[~self.image_mask()]
            if text.numel() and not (0 <= int(text.min()) and int(text.max()) < vocab_size):
                raise ValueError(f"PackedBatch: token ids must lie in [0, {vocab_size})")
            labels = self.labels[self.labels != IGNORE_INDEX]
            if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab_size):
                raise ValueError(f"PackedBatch: labels must lie in [0, {vocab_size}) or be {IGNORE_INDEX}")

    def _check_anyres(self) -> None:
        """The AnyRes fields agree with each other, with the grid, with pixel_values and with the placeholders:
        each maximal run of placeholders holds whole images, in order."""
        grid, sizes = self.anyres, self.image_sizes
        n = len(sizes or ())
        if self.image_tile_counts is None or self.image_token_counts is None or self.feature_index is None or \
                len(self.image_tile_counts) != n or len(self.image_token_counts) != n:
            raise ValueError("PackedBatch: an AnyRes batch needs image_sizes, image_tile_counts, image_token_counts "
                             "(one per image) and feature_index; build it with from_samples(..., anyres=)")
        if self.num_image_tokens != grid.side ** 2:
            raise ValueError(f"PackedBatch: num_image_tokens={self.num_image_tokens} but an AnyRes tile yields "
                             f"{grid.side}^2 = {grid.side ** 2} features")
        for k, size in enumerate(sizes):
            expected = (grid.num_tiles(size), grid.num_tokens(size))
            if (self.image_tile_counts[k], self.image_token_counts[k]) != expected:
                raise ValueError(f"PackedBatch: image {k} of size {tuple(size)} has {self.image_tile_counts[k]} tiles "
                                 f"and {self.image_token_counts[k]} tokens; its grid gives {expected[0]} and "
                                 f"{expected[1]}")
        tiles = sum(self.image_tile_counts)
        shape = None if self.pixel_values is None else tuple(self.pixel_values.shape)
        if tiles and shape != (tiles, shape[1], grid.tile, grid.tile) or not tiles and shape is not None:
            raise ValueError(f"PackedBatch: {n} AnyRes images of {tiles} tiles need pixel_values of "
                             f"({tiles}, 3, {grid.tile}, {grid.tile}), got {shape}")
        index = self.feature_index
        features = tiles * grid.side ** 2
        if index.dtype != torch.long or index.shape != (sum(self.image_token_counts),) or \
                index.numel() and not (0 <= int(index.min()) and int(index.max()) <= features):
            raise ValueError(f"PackedBatch: feature_index must be ({sum(self.image_token_counts)},) int64 rows in "
                             f"[0, {features}] (the last being image_newline)")
        mask = self.image_mask().to(torch.int8)
        edges = torch.diff(mask, prepend=mask.new_zeros(1), append=mask.new_zeros(1))
        runs = ((edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()).tolist()
        counts = iter(self.image_token_counts)
        for run in runs:
            while run > 0:
                run -= next(counts, run + 1)
            if run < 0:
                raise ValueError(f"PackedBatch: the image placeholders do not split into whole images of "
                                 f"{list(self.image_token_counts)} tokens, in order")

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
    def from_samples(cls, samples: Sequence[dict], *, image_token_id: int, num_image_tokens: int,
                     anyres: AnyResGrid | None = None) -> "PackedBatch":
        """Pack tokenized samples into one sequence.

        samples: dicts with
          input_ids    (L,) int64 with ONE `image_token_id` per image,
          labels       (L,) int64, IGNORE_INDEX where no loss (the image token's label is ignored),
          pixel_values (n_images, 3, H, W) or None, one image per image token, in order;
                       AnyRes: (n_tiles, 3, S, S), each image's tiles in turn (base image first),
          image_sizes  AnyRes only: (height, width) of each image, in order (what the tiles were made from).
        anyres: the model's grid (LlavaConfig.anyres) for an AnyRes model, None at fixed resolution.
        """
        if not samples:
            raise ValueError("PackedBatch.from_samples: got no samples")
        if anyres is not None and num_image_tokens != anyres.side ** 2:
            raise ValueError(f"from_samples: num_image_tokens={num_image_tokens} but an AnyRes tile yields "
                             f"{anyres.side}^2 features")
        ids_out, labels_out, pos_out, images = [], [], [], []
        lengths, sizes, tile_counts, token_counts = [], [], [], []
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
            if anyres is None:
                if n_tags != n_pixels:
                    raise ValueError(f"sample {i}: {n_tags} image tokens (id {image_token_id}) but {n_pixels} "
                                     "images in pixel_values")
                # Each image token becomes num_image_tokens placeholders; label and position follow.
                repeats = torch.where(is_image, num_image_tokens, 1)
            else:
                repeats = cls._anyres_repeats(i, sample, is_image, n_pixels, anyres, sizes, tile_counts, token_counts)
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
        extra = {}
        if anyres is not None:
            extra = dict(anyres=anyres, image_sizes=tuple(sizes), image_tile_counts=tuple(tile_counts),
                         image_token_counts=tuple(token_counts),
                         feature_index=cls._feature_index(anyres, sizes, tile_counts))
        batch = cls(
            input_ids=torch.cat(ids_out),
            labels=torch.cat(labels_out),
            position_ids=torch.cat(pos_out),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
            pixel_values=torch.cat(images) if images else None,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            **extra,
        )
        # Once, here, on the host: the model's forward trusts these invariants (docs/kernels.md, "No host
        # reads inside a micro-step").
        batch.check()
        return batch

    @staticmethod
    def _anyres_repeats(i, sample, is_image, n_pixels, anyres, sizes, tile_counts, token_counts) -> torch.Tensor:
        """Positions each token of AnyRes sample `i` expands to; appends its images' sizes and counts."""
        n_tags = int(is_image.sum())
        image_sizes = [tuple(int(x) for x in hw) for hw in sample.get("image_sizes") or ()]
        if len(image_sizes) != n_tags:
            raise ValueError(f"sample {i}: {n_tags} image tokens but {len(image_sizes)} image_sizes (an AnyRes "
                             "sample gives the (height, width) of each image)")
        tiles = [anyres.num_tiles(hw) for hw in image_sizes]
        if sum(tiles) != n_pixels:
            raise ValueError(f"sample {i}: images of sizes {image_sizes} make {tiles} tiles at this model's grid, "
                             f"{sum(tiles)} in all, but pixel_values has {n_pixels} rows")
        tokens = [anyres.num_tokens(hw) for hw in image_sizes]
        sizes += image_sizes
        tile_counts += tiles
        token_counts += tokens
        repeats = torch.ones_like(is_image, dtype=torch.long)
        repeats[is_image] = torch.tensor(tokens, dtype=torch.long)
        return repeats

    @staticmethod
    def _feature_index(anyres: AnyResGrid, sizes, tile_counts) -> torch.Tensor:
        """PackedBatch.feature_index of images of `sizes` whose tiles are rows of pixel_values in turn."""
        per_tile = anyres.side ** 2
        firsts = [0] + torch.cumsum(torch.tensor(tile_counts, dtype=torch.long), 0).tolist()
        parts = [anyres.feature_rows(hw, first * per_tile) for hw, first in zip(sizes, firsts)]
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return torch.where(index < 0, firsts[-1] * per_tile, index)  # the newline row follows every tile's
