"""A model directory's files: config.json, safetensors shards and their index, read and written.

Weights published as torch pickles (pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + their index,
as Vicuna-v1.5 and LLaVA's released checkpoints ship them) are read with torch.load(weights_only=True),
which refuses any pickle that is not tensors in plain containers, and converted once per machine to
safetensors in the project cache (`converted_from_bin`); every reader below then sees safetensors only.

Reading streams: `iter_tensors` hands out one tensor at a time, or a `RowReader` that reads only the rows
asked for with plain file reads (sharded loading, train/sharded_load.py). Writing streams too:
`ShardWriter` holds only the shard being filled. Nothing here knows LLaVA or its key names (keys.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache_dir import cache_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"


# --- reading --------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A model directory's config.json as a dict; ValueError naming the directory when absent or invalid."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None


def _indexed_files(index: Path) -> list[Path]:
    """The shard files an index's weight_map names, in first-mention order, checked to exist."""
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: shard named in {index.name} is missing")
    return files


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors shard files of a model directory, checked to exist; a directory with only torch
    pickles (.bin) gives the files of its converted copy in the cache (safetensors win where both exist)."""
    if (path / INDEX_FILE).is_file():
        return _indexed_files(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / BIN_INDEX_FILE).is_file() or (path / BIN_SINGLE_FILE).is_file():
        return checkpoint_files(converted_from_bin(path))
    found = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {found}, but no {BIN_SINGLE_FILE} or {BIN_INDEX_FILE})" if found else ""
    raise ValueError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE}, {BIN_SINGLE_FILE} or {BIN_INDEX_FILE}{hint}")


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A torch-pickled state dict, memory-mapped, through torch.load(weights_only=True): a pickle holding
    anything but tensors in plain containers (one that would run code when unpickled) is refused, naming
    the file, before any of its objects is built."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the pre-1.6 (non-zip) format cannot be mapped: read it whole
            if "mmap can only be used" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{file}: refused: not only tensors (torch.load weights_only=True: {reason})") from None
    except (RuntimeError, EOFError, IndexError, KeyError) as e:  # truncated or not torch.save's at all
        raise ValueError(f"{file}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
        raise ValueError(f"{file}: expected a dict of name -> tensor (a state dict), got {type(state).__name__}")
    return state


def converted_from_bin(path: Path) -> Path:
    """A directory of safetensors shards (+ index) holding the tensors of `path`'s .bin files, converted
    once per machine: `$FASTLLAVA_CACHE/safetensors-from-bin/<key>`, the key hashing the directory and each
    .bin file's name, size and mtime (a changed file converts again). Each process converts into a
    directory of its own and renames it into place, so a reader never sees a half-written copy and
    processes that convert at the same time (ranks of one node) cost time, never correctness."""
    bins = _indexed_files(path / BIN_INDEX_FILE) if (path / BIN_INDEX_FILE).is_file() else [path / BIN_SINGLE_FILE]
    key = hashlib.sha256(str(path.resolve()).encode())
    for f in bins:
        st = f.stat()
        key.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    target = cache_dir("safetensors-from-bin", key.hexdigest()[:32])
    if target.is_dir():
        return target
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        names = [SINGLE_FILE] if len(bins) == 1 else [
            f"model-{i + 1:05d}-of-{len(bins):05d}.safetensors" for i in range(len(bins))]
        weight_map: dict[str, str] = {}
        for i, (f, name) in enumerate(zip(bins, names)):
            # 13B is ~26 GB of pickles: minutes, hence a line per shard.
            print(f"fastllava: converting {f} to safetensors ({i + 1}/{len(bins)}, once; cached in {target})",
                  file=sys.stderr, flush=True)
            state = _own_storages(load_bin(f))
            for k in state:
                if k in weight_map:
                    raise ValueError(f"{f}: key {k!r} appears again (first in {weight_map[k]})")
                weight_map[k] = name
            save_file(state, str(work / name), metadata={"format": "pt"})
            del state
        if len(bins) > 1:
            (work / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        try:
            work.rename(target)
        except OSError:  # another process renamed its own copy first: same tensors, keep that one
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _own_storages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: one that shares its storage with another (tied weights saved once in
    the pickle) or views part of a larger one is copied; the rest stay memory-mapped."""
    seen: set[int] = set()
    out = {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.contiguous().clone() if ptr in seen else _alone(t).contiguous()
        seen.add(ptr)
    return out


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a directory's shards, without reading any tensor."""
    keys = []
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:
            keys.extend(shard.keys())
    return keys


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class RowReader:
    """One tensor of a safetensors file, read on demand with plain file reads: `reader[a:b, ...]` reads
    only rows a..b-1 (dim 0, how FSDP shards), `get_shape()` reads nothing. Unlike the memory-mapped
    file, the bytes read are this process's own memory, freed as soon as the rows are copied, so a rank
    that reads a slice never holds the rest of the file in its resident memory."""

    def __init__(self, file: Path, entry: dict, data_start: int):
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: dtype {entry['dtype']} is not supported")
        self.file, self.dtype, self.shape = file, _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])
        self.offset = data_start + entry["data_offsets"][0]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "RowReader":
        """Rows start..start+length-1 as a reader of their own, reading nothing now (torch.narrow's signature,
        dim 0 only): a part of a stacked tensor (model/stacked.py) that still reads only the rows asked for."""
        if dim != 0 or not 0 <= start <= start + length <= (self.shape[0] if self.shape else 0):
            raise ValueError(f"{self.file}: rows {start}..{start + length} of a tensor of shape {self.shape}")
        part = object.__new__(RowReader)
        part.file, part.dtype, part.shape = self.file, self.dtype, (length, *self.shape[1:])
        part.offset = self.offset + start * _numel(self.shape[1:]) * self.dtype.itemsize
        return part

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if not self.shape:  # a scalar
            return self._read(0, 1, ())
        start, stop, step = (index[0] if index else slice(None)).indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.file}: only contiguous row ranges are read, not step {step}")
        row = _numel(self.shape[1:])
        rows = max(0, stop - start)
        tensor = self._read(start * row, rows * row, (rows, *self.shape[1:]))
        return tensor[(slice(None), *index[1:])] if len(index) > 1 else tensor

    def _read(self, first: int, count: int, shape) -> torch.Tensor:
        size = self.dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=self.dtype)
        buffer = bytearray(count * size)
        with open(self.file, "rb") as f:
            f.seek(self.offset + first * size)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.file}: truncated tensor data")
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (key -> dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def iter_tensors(path: Path, lazy: bool = False) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, tensor) for every tensor of a directory's shards, one tensor in memory at a time.

    lazy: yield a RowReader instead of the tensor (get_shape(), and `reader[a:b]` reads only those rows)."""
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:  # validates the file; its key order for both modes
            header, data_start = read_header(f) if lazy else (None, 0)
            for key in shard.keys():
                if key in seen:
                    raise ValueError(f"{f}: key {key!r} appears again (first in {seen[key]})")
                seen[key] = f
                yield key, f, RowReader(f, header[key], data_start) if lazy else shard.get_tensor(key)


# --- writing --------------------------------------------------------------------------------------


class ShardWriter:
    """A checkpoint directory written as its tensors arrive: config.json, safetensors shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own), and the index when there is more than one
    shard, named as transformers names them (model.safetensors, or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json). Only the shard being filled is held in memory, so an export streamed
    tensor by tensor (train/export.py) never holds the model. Shards of a former checkpoint in `path` are
    removed first. Use as a context manager; config["dtype"] is the first tensor's."""

    def __init__(self, path: Path, config: dict, max_shard_bytes: int):
        self.path, self.config, self.max_shard_bytes = path, config, max_shard_bytes
        path.mkdir(parents=True, exist_ok=True)
        for old in [*path.glob("model-*-of-*.safetensors"), path / SINGLE_FILE, path / INDEX_FILE]:
            old.unlink(missing_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.shards: list[list[str]] = []  # keys of each written shard
        self.dtype: torch.dtype | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.pending or any(key in shard for shard in self.shards):
            raise ValueError(f"{self.path}: tensor {key!r} given twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.dtype = self.dtype or tensor.dtype
        self.pending[key] = _alone(tensor).contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, str(self.path / f"part-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:  # a failed export leaves no half-named checkpoint behind
            for part in self.path.glob("part-*.tmp"):
                part.unlink()
            return
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.path / f"part-{i:05d}.tmp").replace(self.path / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: name for name, keys in zip(names, self.shards) for k in keys}}
            (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if self.dtype is not None:
            self.config["dtype"] = str(self.dtype).removeprefix("torch.")
        (self.path / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def write_checkpoint(path: Path, config: dict, tensors, max_shard_bytes: int) -> None:
    """config.json and safetensors shards (+ the index when more than one) of `tensors`, a dict or an
    iterable of (key, tensor) pairs consumed one at a time (ShardWriter)."""
    with ShardWriter(path, config, max_shard_bytes) as writer:
        for key, t in tensors.items() if isinstance(tensors, dict) else tensors:
            writer.add(key, t)


def _alone(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a storage of its own: tensors gathered from FSDP shards can be views into one larger
    buffer, which safetensors refuses to write (it would store the whole buffer)."""
    t = t.detach()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
