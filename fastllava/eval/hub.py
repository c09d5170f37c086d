"""Benchmarks read from the Hugging Face Hub datasets lmms-eval uses, instead of LLaVA's eval layout.

`--data hub` takes the task's default dataset (`HubSource.repo`), `--data org/name[@revision]` another
repository in the same schema, and `--data DIR` a local copy of such a repository (any folder holding its
parquet files). A repository is fetched with huggingface_hub's snapshot_download: only the split's parquet
files, into the Hub cache, honouring HF_HUB_OFFLINE, HF_TOKEN or a login. Rows are read with pyarrow (the
`hub-eval` extra), only the columns a task reads. An image column (the `datasets` Image feature's {"bytes",
"path"} struct, or a list of them) is not read with the rows: each cell becomes a HubImage, a reference to
its file and row that reads and decodes the image when its prompt is built, so a split's questions take
little memory whatever its images (each of lmms-lab/VQAv2's 107,394 test-dev rows carries its photo). Where a
split's rows reference another config of the repository (GQA's questions name an image of
testdev_balanced_images), both are fetched and joined here (HubSource.join). Each task turns the rows into
the questions LLaVA's layout gives (Task.load_hub).

A bad image is named (file and row) when its prompt is built, not when the rows are read: checking at load
would read every image's bytes once more than answering does. A null image cell is named at load (the
tasks' reading.image_cell).
"""

from __future__ import annotations

import io
import os
import threading
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..extras import require
from .tasks.base import EvalDataError, HubSource, LazyImage

_FEATURE = "reading benchmarks from Hub parquet files (--data hub)"
# Encoded bytes of the image column's row groups last read, kept while under this: the questions on one image
# may be far apart in a split (GQA's 12,578 questions name the 398 images of another config), and
# `datasets` writes image datasets in row groups of 100 rows (PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS), a few
# MB to tens of MB each.
ROW_GROUP_CACHE_BYTES = 512 << 20


def is_hub_spec(data: str) -> bool:
    """Whether `--data` names the Hub (`hub`, `org/name[@rev]`, or a local folder of parquet files) rather
    than LLaVA's layout."""
    path = Path(data)
    if path.is_dir():  # two levels only: a LLaVA layout holds ~10^5 images further down
        return any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))
    return data == "hub" or (data.count("/") == 1 and not data.startswith((".", "/")))


def resolve(data: str, source: HubSource) -> Path:
    """The local folder holding `source`'s parquet files for `--data data`: the folder itself, or the Hub
    cache's snapshot of the repository (downloaded if not cached; HF_HUB_OFFLINE=1 reads the cache only)."""
    path = Path(data)
    if path.is_dir():
        return path
    repo, _, revision = (source.repo if data == "hub" else data).partition("@")
    import huggingface_hub  # a dependency of transformers: always installed

    patterns = [source.pattern] + ([source.join.pattern] if source.join else [])
    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision or None,
                                                      allow_patterns=patterns))
    except Exception as e:  # huggingface_hub's errors (offline, not found, gated) say why; name the dataset too
        raise EvalDataError(data, None, f"not a local folder, and could not fetch the Hub dataset {repo!r} "
                                        f"(files {', '.join(patterns)}): {type(e).__name__}: {e}") from None


def read_rows(folder: Path, source: HubSource) -> list[tuple[Path, int, dict]]:
    """(parquet file, 0-based row, {column: value}) of every row of the files matching source.pattern
    under `folder`, files in name order (the shards' order), with the columns of the joined config's
    matching row added (source.join). EvalDataError for no file, a missing column or a key with no row."""
    join = source.join
    # A folder without the repository's layout: any parquet file in it is the split, unless a second config
    # must be told apart from it.
    rows = _read(folder, source.pattern, source.columns, source.repo, fallback=join is None)
    if join is None:
        return rows
    table = {}
    for file, i, row in _read(folder, join.pattern, (join.key, *join.columns), source.repo, fallback=False):
        table.setdefault(row[join.key], row)
    for file, i, row in rows:
        match = table.get(row[join.on])
        if match is None:
            raise EvalDataError(file, None, f"row {i}: {join.on} {row[join.on]!r} has no row with that {join.key} "
                                            f"in {join.pattern} of {source.repo}")
        row.update({c: match[c] for c in join.columns})
    return rows


def _read(folder: Path, pattern: str, columns: tuple[str, ...], repo: str, *, fallback: bool):
    pq = require("pyarrow.parquet", _FEATURE)
    files = sorted(Path(folder).glob(pattern)) or (sorted(Path(folder).rglob("*.parquet")) if fallback else [])
    if not files:
        raise EvalDataError(folder, None, f"no parquet file (expected {pattern}, from {repo})")
    rows = []
    for file in files:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise EvalDataError(file, None, f"expected the columns of {repo} ({', '.join(columns)}); "
                                            f"missing {', '.join(missing)}")
        images = {c: _image_leaf(parquet, c) for c in columns if _is_image(schema.field(c).type)}
        # Only the columns read: the others of a split (VQAv2's answers, GQA's programs) stay on disk; of an image
        # column only its "path" leaf, which tells a null cell, and a list's length, without the bytes.
        table = parquet.read(columns=[images.get(c, c) for c in columns])
        for i, row in enumerate(table.to_pylist()):
            for c in images:
                row[c] = _references(row[c], file, c, i)
            rows.append((file, i, row))
    return rows


def _is_image(kind) -> bool:
    """Whether an arrow type is an image cell (a struct with "bytes") or a list of them."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _image_leaf(parquet, column: str) -> str:
    """The parquet path of the image column's "path" leaf ("image.path", "image.list.element.path"), else its
    first leaf."""
    leaves = [parquet.schema.column(k).path for k in range(len(parquet.schema))]
    mine = [p for p in leaves if p.startswith(column + ".")]
    return next((p for p in mine if p.endswith(".path")), mine[0])


def _references(cell, file: Path, column: str, row: int):
    """The HubImage(s) of a cell read through its leaf: None for a null cell, a list for a list of images."""
    if cell is None:
        return None
    if isinstance(cell, list):
        return [HubImage(file, column, row, k) for k in range(len(cell))]
    return HubImage(file, column, row)


@dataclass(frozen=True)
class HubImage(LazyImage):
    """An image cell left in its parquet file until a prompt needs it (EvalQuestion.images): `open()` reads it
    (through a cache of row groups) and decodes it. row: 0-based in `file`; item: the index in a list-of-images
    cell (SEED-Bench's frames), None for an image cell."""

    file: Path
    column: str
    row: int
    item: int | None = None

    def open(self) -> Image.Image:
        """The RGB image; EvalDataError naming the file and row for a cell without bytes or bytes that do not
        decode."""
        cell = _ROW_GROUPS.cell(self.file, self.column, self.row)
        return decode_image(cell if self.item is None else cell[self.item], self.file, self.row)


def decode_image(cell, file: Path, row: int) -> Image.Image:
    """The RGB image of a row's image cell ({"bytes": ..., "path": ...}); EvalDataError naming the file and
    row for a cell without bytes or bytes that do not decode."""
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise EvalDataError(file, None, f"row {row}: expected an image cell {{'bytes': ..., 'path': ...}} with bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several kinds for corrupt data
        raise EvalDataError(file, None, f"row {row}: image does not decode ({e})") from None


class _RowGroups:
    """One column of the row groups last read, the least recently used dropped past `budget` bytes (the one
    just read always stays). Thread-safe: run.py builds prompts in a background thread."""

    def __init__(self, budget: int):
        self.budget, self.lock = budget, threading.Lock()
        self.files: dict[tuple, tuple] = {}  # file version -> (ParquetFile, first row of each row group)
        self.groups: OrderedDict[tuple, object] = OrderedDict()  # (file version, column, group) -> arrow array

    def cell(self, file: Path, column: str, row: int):
        """The Python value of `column` at `row` of `file` (0-based)."""
        stat = os.stat(file)
        version = (file, stat.st_mtime_ns, stat.st_size)  # a file written again is read again
        with self.lock:
            if version not in self.files:
                parquet = require("pyarrow.parquet", _FEATURE).ParquetFile(file)
                counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                self.files[version] = parquet, [sum(counts[:g]) for g in range(len(counts))]
            parquet, starts = self.files[version]
            group = bisect_right(starts, row) - 1
            key = (version, column, group)
            if key in self.groups:
                self.groups.move_to_end(key)
            else:
                self.groups[key] = parquet.read_row_group(group, columns=[column]).column(0)
                while len(self.groups) > 1 and sum(a.nbytes for a in self.groups.values()) > self.budget:
                    self.groups.popitem(last=False)
            array = self.groups[key]
        return array[row - starts[group]].as_py()


_ROW_GROUPS = _RowGroups(ROW_GROUP_CACHE_BYTES)
