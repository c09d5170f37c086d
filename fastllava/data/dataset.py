"""LlavaDataset: one training sample per entry of LLaVA-format files, tokenized and masked on access.

Reject policy (one policy for every way a sample can fail):
  * structural problems are found when the files are read (files.py);
  * template mismatches, over-long samples under overlong="reject", and samples left without label
    tokens are found when the sample is tokenized (in lengths() or __getitem__);
  * unreadable or missing images are found when the sample is loaded (__getitem__).
Each reject is appended to the rejects file (JSONL: file, index, line, id, reason, detail) and counted in
`dataset.rejects.counts`. With strict=True the first one raises ValueError naming the file, entry, id and
(for images) the path. Otherwise __getitem__ returns None for a rejected sample; the collation
(packing.collate_pack) skips None and counts it, so nothing disappears unnoticed.

lengths() is what the packing planner plans with: tokens after image expansion and truncation, exactly
the length __getitem__ produces. A sample rejected at tokenization keeps a placeholder length of 1 (the
planner needs every index; __getitem__ returns None for it); `valid()` tells them apart.

With image_mode "anyres" (LLaVA-NeXT) every image has its own count, which depends only on its size:
lengths() reads each image's (height, width) from its file header (anyres_images.image_size, no pixel
decoded) and counts with the model's grid; an unreadable header rejects the sample there, reason "image".
The cache key then holds the grid too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..batch import AnyResGrid
from ..cache_dir import cache_dir as default_cache_dir
from ..progress import progress
from .files import RejectLog, SampleError, default_rejects_path, image_list, load_records
from .lengths import cache_lock, length_workers, pooled_lengths
from .templates import get_template
from .tokenize import (OVERLONG_POLICIES, Fit, encode_sample, load_tokenizer, prepare_tokenizer,
                       tokenizer_fingerprint)

_LENGTHS_CACHE_VERSION = 1
IMAGE_MODES = ("pad", "square", "anyres")


class LlavaDataset(Dataset):
    """Samples of LLaVA-format data files.

    data_path: a JSON/JSONL file or a list of them. image_folder: root of the "image" paths (None for
    text-only data). tokenizer: a fast tokenizer or a local directory; `<image>` and a pad token are
    added to it in place (prepare_tokenizer). template: "plain" (stage 1), "vicuna_v1" (stage 2) or a
    Template. image_mode: "pad" (LLaVA-1.5's pad-to-square), "square" (resize) or "anyres" (LLaVA-NeXT's
    tiles at the grid `anyres`, the model's LlavaConfig.anyres; required with it and only with it).
    num_image_tokens: positions one image occupies after expansion (576 for CLIP ViT-L/14 at 336 px); AnyRes:
    features per tile (each image's count is anyres.num_tokens(its size)).
    overlong: "truncate" (cut at model_max_length, never inside an image) or "reject".
    image_loader: callable(path, mode=, size=) -> (3, S, S) tensor; default fastllava.data.images.load_image.
    AnyRes: -> (n_tiles, 3, S, S), the base image and the tiles (anyres_loader; the default is CLIP's processor).
    cache_dir: where lengths() caches per-file results (default: fastllava.cache_dir.cache_dir(), i.e.
    $FASTLLAVA_CACHE or ~/.cache/fastllava; None disables). Processes sharing it compute a file's lengths
    one at a time, so the first computes and the others read its cache (data/lengths.py).
    length_workers: processes that tokenize for lengths() (default: $FASTLLAVA_LENGTH_WORKERS, else this
    process's cores; without a cache, divided among the LOCAL_WORLD_SIZE ranks that all compute).

    dataset[i] -> {"input_ids": (L,) int64 with one image token per image, "labels": (L,) int64,
                   "pixel_values": (n_images, 3, S, S) float or None, "id": str}  or None if rejected;
                   AnyRes: pixel_values (n_tiles, 3, S, S), each image's tiles in turn, and "image_sizes",
                   [(height, width), ...] per image (PackedBatch.from_samples(..., anyres=)).
    """

    def __init__(self, data_path, image_folder, tokenizer, template, *, image_mode: str = "pad",
                 image_size: int = 336, num_image_tokens: int = 576, model_max_length: int = 2048,
                 overlong: str = "truncate", strict: bool = False, rejects_path=None,
                 image_loader: Callable | None = None, check_images: bool = False,
                 cache_dir: str | os.PathLike | None | bool = True, verbose: bool = True,
                 length_workers: int | None = None, anyres: AnyResGrid | None = None):
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if (image_mode == "anyres") != (anyres is not None):
            raise ValueError(f"image_mode {image_mode!r} with anyres={anyres}: image_mode 'anyres' needs the model's "
                             "AnyRes grid (LlavaConfig.anyres), and the grid needs image_mode 'anyres'")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if num_image_tokens < 1 or model_max_length < 1 or image_size < 1:
            raise ValueError(f"num_image_tokens, model_max_length and image_size must be >= 1, got "
                             f"{num_image_tokens}, {model_max_length}, {image_size}")
        single = isinstance(data_path, (str, os.PathLike))
        paths = [os.fspath(data_path)] if single else [os.fspath(p) for p in data_path]
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.ids = prepare_tokenizer(tokenizer)
        self.image_token_id = self.ids.image_token_id
        self.template = get_template(template)
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.image_mode, self.image_size, self.anyres = image_mode, image_size, anyres
        self.num_image_tokens, self.model_max_length, self.overlong = num_image_tokens, model_max_length, overlong
        self.fit = Fit(self.image_token_id, num_image_tokens, model_max_length, overlong)
        self.image_loader = image_loader
        self.cache_dir = (os.fspath(default_cache_dir()) if cache_dir is True
                          else os.fspath(cache_dir) if cache_dir else None)
        self.verbose = verbose
        self.length_workers = length_workers
        self.lengths_computed = 0  # files whose lengths this process tokenized (the others came from the cache)
        self.rejects = RejectLog(rejects_path if rejects_path is not None else default_rejects_path(paths),
                                 strict=strict)
        self.records = load_records(paths, rejects=self.rejects, image_folder=self.image_folder,
                                    check_images=check_images, verbose=verbose)
        self._lengths: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self.num_truncated = 0  # set by lengths(): samples cut to model_max_length

    # ------------------------------------------------------------------------------------------ lengths

    def __len__(self) -> int:
        return len(self.records)

    def has_image(self) -> np.ndarray:
        """(N,) bool: the sample has at least one image (the reference groups batches by this)."""
        return self.records.has_image

    def valid(self) -> np.ndarray:
        """(N,) bool: not rejected at tokenization (computes lengths() if needed)."""
        self.lengths()
        return self._valid

    def lengths(self) -> np.ndarray:
        """(N,) int64 tokens per sample after image expansion and truncation; 1 for a rejected sample.
        Computed once (batched tokenization, cached per file in cache_dir)."""
        if self._lengths is None:
            lengths = np.ones(len(self), dtype=np.int64)
            valid = np.ones(len(self), dtype=bool)
            truncated = 0
            rejected: Counter[str] = Counter()  # the files' summary was printed before these were known
            for f_i, path in enumerate(self.records.files):
                rows = np.flatnonzero(self.records.file_ix == f_i)
                per_entry, cut, errors = self._file_lengths(path, rows)
                entries = self.records.entry_ix[rows]
                lengths[rows] = np.maximum(per_entry[entries], 1)
                truncated += int((cut[entries] & (per_entry[entries] > 0)).sum())
                for row, entry in zip(rows.tolist(), entries.tolist()):
                    if entry in errors:
                        valid[row] = False
                        reason, detail = errors[entry]
                        self.rejects.add(self.records.reject(row, reason, detail))
                        rejected[reason] += 1
            self.num_truncated = truncated
            if self.verbose and truncated:
                print(f"data: {truncated} samples truncated to model_max_length={self.model_max_length}",
                      file=sys.stderr)
            if self.verbose and rejected:
                print(f"data: {rejected.total()} more rejected while computing lengths ({_by_reason(rejected)}), "
                      f"{int(valid.sum())} of {len(self)} samples left\n  rejects written to {self.rejects.path}",
                      file=sys.stderr)
            self._lengths, self._valid = lengths, valid
        return self._lengths

    def describe_rejects(self) -> str:
        """The rejects so far, for a message: how many of the entries read, by reason (the commonest first), one
        of the commonest reason's in full, and the rejects file that lists them all."""
        counts, files = self.rejects.counts, ", ".join(self.records.files)
        if not counts:
            return f"none of the {self.records.summary.entries} entries of {files} was rejected"
        top = counts.most_common(1)[0][0]
        example = next((r for r in self.rejects.examples if r.reason == top), self.rejects.examples[0])
        where = f"; the rejects file {self.rejects.path} lists each" if self.rejects.path else ""
        return (f"{counts.total()} of the {self.records.summary.entries} entries of {files} rejected "
                f"({_by_reason(counts)}), e.g. {example.describe()}{where}")

    def _cache_path(self, path: str) -> str | None:
        if self.cache_dir is None:
            return None
        st = os.stat(path)
        fields = [_LENGTHS_CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
                  tokenizer_fingerprint(self.tokenizer), self.template.name, self.num_image_tokens,
                  self.model_max_length, self.overlong]
        if self.anyres is not None:  # appended, so that a fixed-resolution run keeps its key and its cache
            a = self.anyres
            fields.append(["anyres", [list(p) for p in a.pinpoints], a.tile, a.side, self.image_folder])
        key = json.dumps(fields)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]
        return os.path.join(self.cache_dir, "lengths", f"{os.path.basename(path)}.{digest}.npz")

    def _file_lengths(self, path: str, rows: np.ndarray):
        """(lengths, truncated) indexed by entry position in `path` (length 0 where not computed) and
        {entry: (reason, detail)} for tokenization rejects.
        A cached file covers every valid entry, so a different check_images setting still finds it whole."""
        cache = self._cache_path(path)
        entries = self.records.entry_ix[rows]
        lock = None if cache is None else os.path.join(self.cache_dir, "locks", os.path.basename(cache) + ".lock")
        with cache_lock(lock, verbose=self.verbose):  # one process at a time: the others find its cache
            if cache is not None and os.path.exists(cache):
                with np.load(cache) as z:
                    per_entry, cut = z["lengths"], z["truncated"]
                    errors = {int(k): tuple(v) for k, v in json.loads(str(z["errors"])).items()}
                if len(entries) == 0 or (per_entry.size > entries.max() and
                                         all(per_entry[e] > 0 or e in errors for e in entries.tolist())):
                    return per_entry, cut, errors
            return self._compute_file_lengths(cache, path, rows)

    def _compute_file_lengths(self, cache: str | None, path: str, rows: np.ndarray):
        entries = self.records.entry_ix[rows]
        n_entries = int(entries.max()) + 1 if len(entries) else 0
        per_entry = np.zeros(n_entries, dtype=np.int64)
        cut = np.zeros(n_entries, dtype=bool)
        workers = length_workers(self.length_workers)
        if cache is None and self.length_workers is None:  # every rank of the node computes at once
            workers = max(1, workers // int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1))
        bar = progress(len(rows), desc=f"lengths of {os.path.basename(path)}", unit="sample", file=sys.stderr,
                       enabled=self.verbose and len(rows) > 20000)
        image_tokens = None if self.anyres is None else (lambda k: self._header_tokens(int(rows[k]))[1])
        lens, cuts, errs = pooled_lengths(len(rows), lambda k: self.records[int(rows[k])]["conversations"],
                                          self.tokenizer, self.template, self.fit, get_image_tokens=image_tokens,
                                          workers=workers, on_chunk=bar.update)
        bar.close()
        per_entry[entries], cut[entries] = lens, cuts
        errors = {int(entries[k]): (e.reason, e.detail) for k, e in errs.items()}
        self.lengths_computed += 1
        if cache is not None:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp.npz"
            errors_json = json.dumps({str(k): v for k, v in errors.items()})
            np.savez(tmp, lengths=per_entry, truncated=cut, errors=np.array(errors_json))
            os.replace(tmp, cache)  # atomic: concurrent ranks never read a half-written cache
        return per_entry, cut, errors

    # ------------------------------------------------------------------------------------------ samples

    def describe_sample(self, i: int) -> str:
        """Where sample i comes from, for messages: file, entry (line), id and image paths."""
        file, index, line = self.records.source(i)
        images = [os.path.join(self.image_folder or "", p) for p in image_list(self.records[i])]
        return (f"{file} entry {index}" + (f" (line {line})" if line else "") + f", id {self.records.ids[i]!r}"
                + (f", images {images}" if images else ""))

    def _reject(self, i: int, reason: str, detail: str) -> None:
        self.rejects.add(self.records.reject(i, reason, detail))  # raises in strict mode

    def _load_image(self, path: str) -> torch.Tensor:
        if self.image_loader is None:
            from .images import load_image  # lazy: Pillow/DALI only when images are read

            self.image_loader = load_image if self.anyres is None else anyres_loader(None, self.anyres)
        return self.image_loader(path, mode=self.image_mode, size=self.image_size)

    def _image_paths(self, i: int) -> list[str]:
        paths = image_list(self.records[i])
        if paths and self.image_folder is None:
            raise ValueError(f"sample {self.records.ids[i]!r} has images but the dataset has image_folder=None")
        return [os.path.join(self.image_folder, p) for p in paths]

    def _header_tokens(self, i: int) -> tuple[list[tuple[int, int]], list[int]]:
        """AnyRes: ((height, width) of each image of sample i from its header, its placeholder count).
        SampleError "image" naming the file when a header cannot be read."""
        from .anyres_images import image_size  # lazy, as _load_image

        sizes = []
        for full in self._image_paths(i):
            try:
                sizes.append(image_size(full))
            except Exception as e:  # any unreadable header is this sample's problem, as a failed decode
                raise SampleError("image", f"image {full!r}: {type(e).__name__}: {e}") from None
        return sizes, [self.anyres.num_tokens(hw) for hw in sizes]

    def __getitem__(self, i: int) -> dict | None:
        if self._valid is not None and not self._valid[i]:
            return None  # rejected while computing lengths, already logged
        record = self.records[i]
        sizes = None
        try:
            counts = None
            if self.anyres is not None:
                sizes, counts = self._header_tokens(i)  # the header sizes lengths() counted with
            enc = encode_sample(record["conversations"], self.tokenizer, self.template, self.fit, counts)
            if counts is not None and self._lengths is not None and enc.length != self._lengths[i]:
                # the planner packed it at its cached length: an image replaced by one of another size since
                raise SampleError("image", f"images {self._image_paths(i)} now give {enc.length} tokens, the lengths "
                                           f"cache {self._lengths[i]}: an image changed size since the lengths "
                                           f"were computed (delete {os.path.join(self.cache_dir or '', 'lengths')})")
        except SampleError as e:
            self._reject(i, e.reason, e.detail)
            return None
        pixel_values = None
        paths = self._image_paths(i)[: enc.num_images]  # truncation may have cut trailing images
        if paths:
            images = []
            for full in paths:
                try:
                    images.append(self._load_image(full))
                except Exception as e:  # any decode failure is this sample's problem, not the run's
                    self._reject(i, "image", f"image {full!r}: {type(e).__name__}: {e}")
                    return None
            pixel_values = torch.cat(images) if sizes is not None else torch.stack(images)
        sample = {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixel_values,
                  "id": self.records.ids[i]}
        if sizes is not None:
            sample["image_sizes"] = sizes[: enc.num_images]
        return sample


def _by_reason(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def anyres_loader(processor, grid: AnyResGrid) -> Callable:
    """The dataset's image_loader for image_mode "anyres": path -> (n_tiles, 3, S, S), the base image and the
    tiles at `grid`'s pinpoints, through the tower's per-tile `processor` (data.images.Preprocess; None: CLIP's
    at grid.tile), on DALI when installed as images.load_image (anyres_images.load_anyres_images)."""
    from .anyres_images import AnyRes
    from .images import Preprocess

    spec = AnyRes(processor or Preprocess(grid.tile, grid.tile), grid.pinpoints)
    return partial(_load_tiles, spec=spec)


def _load_tiles(path, mode: str = "anyres", size: int | None = None, *, spec) -> torch.Tensor:
    from .anyres_images import load_anyres_images

    return load_anyres_images([path], spec)[0]
