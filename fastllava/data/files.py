"""Dataset files in LLaVA's format: loading, up-front validation, and the reject log.

A file is a JSON list or JSONL (one object per line) of entries

    {"id": "000123",                       # str (an int is accepted and read as its decimal string)
     "image": "coco/train2017/000123.jpg", # relative to the image folder; a list for several images;
                                           # absent (or null) for a text-only sample
     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

where each `<image>` tag in a human turn marks one image, in order. Entries are checked once, when the
file is read; a structurally bad entry becomes a *reject* (file, index, id, reason) that is written to the
rejects file and counted, never silently dropped. `strict=True` turns the first reject into a ValueError.
Malformed JSON is always fatal, with the file and line.

Valid entries are kept, as the file spells them, in one bytes buffer with an offsets array instead of 665K
Python dicts: DataLoader workers forked from the main process then share the pages instead of copying them
on every reference-count touch, and memory stays near the file size.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")


# ----------------------------------------------------------------------------------------------- rejects


@dataclass(frozen=True)
class Reject:
    """One sample that cannot be used: where it is, and why."""

    file: str
    index: int  # position of the entry in its file (0-based), -1 when unknown
    id: str | None
    reason: str  # short category, used for counting ("roles", "image_tags", "overlong", "image", ...)
    detail: str  # what exactly is wrong, for a human
    line: int | None = None  # 1-based line for JSONL files

    def describe(self) -> str:
        """One line for a person: file, entry, line, id, reason and detail."""
        where = f"{self.file} entry {self.index}" + (f" (line {self.line})" if self.line else "")
        return f"{where}, id {self.id!r}: {self.reason}: {self.detail}"

    def to_json(self) -> str:
        """One line of the rejects file (JSONL)."""
        return json.dumps(
            {"file": self.file, "index": self.index, "line": self.line, "id": self.id,
             "reason": self.reason, "detail": self.detail},
            ensure_ascii=False,
        )


class SampleError(ValueError):
    """A sample that cannot be used (bad structure, template mismatch, over-long, unreadable image).
    `reason` is the counting category; the message says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StrictReject(ValueError):
    """The first reject of a strict run (RejectLog(strict=True)): the data's mistake, which the recipes
    report as one line (train.main). The message is `reject (strict mode): ` and the reject's description."""


class RejectLog:
    """Counts rejects by reason and appends them to a JSONL file, created when the first reject comes.

    A file left by an earlier run is removed on construction, so the file lists this run's rejects only.
    strict=True raises ValueError on the first reject instead. Each (file, index) is recorded once per
    process, so a sample rejected while computing lengths is not logged again by __getitem__. The file is
    opened in append mode for every write: DataLoader worker processes can log to the same file, and each
    line is one small write, so lines do not interleave in practice.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, strict: bool = False):
        self.path = None if path is None else os.fspath(path)
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: list[Reject] = []  # first few, for the summary
        self._seen: set[tuple[str, int]] = set()
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)

    def add(self, reject: Reject) -> None:
        """Count and record `reject` (raise it, in strict mode); a sample already recorded is skipped."""
        if self.strict:
            raise StrictReject(f"reject (strict mode): {reject.describe()}")
        key = (reject.file, reject.index)
        if reject.index >= 0 and key in self._seen:
            return
        self._seen.add(key)
        self.counts[reject.reason] += 1
        if len(self.examples) < 5:
            self.examples.append(reject)
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(reject.to_json() + "\n")

    @property
    def total(self) -> int:
        """Rejects counted so far."""
        return sum(self.counts.values())


def default_rejects_path(data_paths: Sequence[str]) -> str:
    """`<first data file>.rejects.jsonl` next to the data, or in the working directory when that folder is
    not writable (datasets often live on read-only mounts). Ranks > 0 of a torchrun job get their own file
    (".rank<R>"): each rank reads the same files but loads different images."""
    first = os.path.abspath(data_paths[0])
    rank = int(os.environ.get("RANK", "0") or 0)
    name = os.path.basename(first) + (f".rank{rank}" if rank > 0 else "") + ".rejects.jsonl"
    folder = os.path.dirname(first)
    return os.path.join(folder if os.access(folder, os.W_OK) else os.getcwd(), name)


# ---------------------------------------------------------------------------------------------- validation


def _entry_id(entry: object) -> str | None:
    if isinstance(entry, dict):
        value = entry.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def image_list(entry: dict) -> list[str]:
    """The entry's image paths in order ([] for a text-only sample). Assumes a validated entry."""
    image = entry.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def validate_turns(turns: object) -> int:
    """Check a conversation's structure; return its number of <image> tags. Raises SampleError."""
    if not isinstance(turns, list) or not turns:
        raise SampleError("type", "'conversations' must be a non-empty list of turns")
    n_tags = 0
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError("missing_key", f"turn {j} must be an object with 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise SampleError("role", f"turn {j} has unknown role {role!r}; expected 'human' or 'gpt'")
        if role != ROLES[j % 2]:
            raise SampleError(
                "roles", f"turn {j} is from {role!r}; turns must alternate human, gpt, ... starting with human"
            )
        if not isinstance(value, str):
            raise SampleError("type", f"turn {j} 'value' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise SampleError("empty_turn", f"turn {j} ({role}) is empty")
        tags = value.count(IMAGE_TAG)
        if tags and role == "gpt":
            raise SampleError("image_tags", f"turn {j}: {IMAGE_TAG} in a gpt turn; images belong to human turns")
        n_tags += tags
    if len(turns) % 2:
        raise SampleError("roles", f"{len(turns)} turns: the last human turn has no gpt answer")
    return n_tags


def validate_entry(entry: object) -> None:
    """Raise SampleError(reason, detail) if `entry` is not a usable LLaVA sample."""
    if not isinstance(entry, dict):
        raise SampleError("type", f"entry must be a JSON object, got {type(entry).__name__}")
    for key in ("id", "conversations"):
        if key not in entry:
            raise SampleError("missing_key", f"no {key!r} key (keys: {sorted(entry)})")
    if _entry_id(entry) is None:
        raise SampleError("type", f"'id' must be a string or integer, got {type(entry['id']).__name__}")
    image = entry.get("image")
    if image is not None:
        images = [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise SampleError("type", "'image' must be a path string or a list of path strings")
        if not images or any(not p for p in images):
            raise SampleError("type", "'image' holds an empty path or an empty list")
        n_images = len(images)
    else:
        n_images = 0
    n_tags = validate_turns(entry["conversations"])
    if n_tags != n_images:
        raise SampleError("image_tags", f"{n_tags} {IMAGE_TAG} tags but {n_images} image(s)")


# ------------------------------------------------------------------------------------------------ reading


_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (RFC 8259), what json.loads skips
_DECODER = json.JSONDecoder()


class _NotOneList(Exception):
    """The text is not one well-formed JSON list (json.loads of it says where)."""


def _list_items(text: str) -> Iterator[tuple[object, str]]:
    """(entry, its own source text) of each element of a JSON list, decoded one element at a time and
    yielded at once, so that only one decoded entry is alive at a time: holding all of them, as json.load
    does, took 4.1 GB for a 1 GB mix665k-shaped file (2-core CPU, 2026-12-06), for every rank of a node.
    Raises _NotOneList where the text is not one well-formed list. Keeping each entry's text saves
    re-serializing it: on a 50K-entry mix665k-shaped file, json.dumps of the entries cost as much as
    parsing the file (1.0 s each, 2-core CPU, 2026-12-06)."""
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                entry, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError:
                raise _NotOneList from None
            yield entry, text[pos:end]
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise _NotOneList
    if _JSON_SPACE.match(text, pos).end() != len(text):
        raise _NotOneList


def _read_entries(path: str) -> Iterable[tuple[int, int | None, object, str]]:
    """Yield (index, line or None, entry, the entry's JSON text). Malformed JSON raises ValueError naming the
    file and line (for a JSON list, after the entries before the fault were yielded)."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            yield from ((i, None, entry, raw) for i, (entry, raw) in enumerate(_list_items(text)))
        except _NotOneList:
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            raise ValueError(f"{path}: a JSON list that could not be read one entry at a time") from None
        return
    index = 0
    # split on "\n" only: str.splitlines() would also break inside strings holding U+2028 and friends
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON on line {lineno}, column {e.colno}: {e.msg}") from None
        yield index, lineno, entry, line
        index += 1


@dataclass
class DataSummary:
    """What the data files held: entries read, samples kept, images, text-only samples, rejects by reason."""

    files: list[str]
    entries: int = 0  # everything read
    samples: int = 0  # valid
    images: int = 0
    text_only: int = 0
    rejects: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [
            f"data: {self.samples} samples from {self.entries} entries in {len(self.files)} file(s): "
            f"{self.images} images, {self.text_only} text-only samples, {sum(self.rejects.values())} rejected"
        ]
        for reason, count in sorted(self.rejects.items()):
            lines.append(f"  rejected {count} for {reason}")
        return "\n".join(lines)


class Records:
    """The valid entries of one or more dataset files, in file order.

    records[i] -> dict (a fresh parse of the entry); source(i) -> (file, index in file, line or None);
    has_image (N,) bool, num_images (N,) int32, ids list[str]; summary: DataSummary.
    """

    def __init__(self, blob: bytes, offsets: np.ndarray, files: list[str], file_ix: np.ndarray,
                 entry_ix: np.ndarray, lines: np.ndarray, num_images: np.ndarray, ids: list[str],
                 summary: DataSummary):
        self._blob = blob
        self._offsets = offsets  # (N + 1,) int64 byte offsets into _blob
        self.files = files
        self.file_ix = file_ix  # (N,) int32 which file
        self.entry_ix = entry_ix  # (N,) int64 index inside that file
        self.lines = lines  # (N,) int64, 0 when not JSONL
        self.num_images = num_images  # (N,) int32
        self.has_image = num_images > 0
        self.ids = ids
        self.summary = summary

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:
        return json.loads(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def source(self, i: int) -> tuple[str, int, int | None]:
        """(file, index in the file, line or None) of sample i."""
        line = int(self.lines[i])
        return self.files[int(self.file_ix[i])], int(self.entry_ix[i]), line or None

    def reject(self, i: int, reason: str, detail: str) -> Reject:
        """A Reject for sample i."""
        file, index, line = self.source(i)
        return Reject(file, index, self.ids[i], reason, detail, line)


def _checked_images(entry: object, image_folder) -> list[str]:
    """Validate an entry; its image paths. With an image_folder, each image file must exist."""
    validate_entry(entry)
    images = image_list(entry)
    for p in images if image_folder is not None else ():
        full = os.path.join(os.fspath(image_folder), p)
        if not os.path.isfile(full):
            raise SampleError("missing_image", f"image file {full!r} does not exist")
    return images


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rejects: RejectLog | None = None,
    image_folder: str | os.PathLike | None = None,
    check_images: bool = False,
    verbose: bool = True,
) -> Records:
    """Read and validate dataset files (JSON list or JSONL; several files are concatenated in order).

    rejects: where structural rejects go (a RejectLog; strict mode raises on the first). Default: an
    in-memory log without file.
    check_images: also reject entries whose image file does not exist under image_folder (one stat per
    image, so off by default; otherwise a missing image is found when the sample is loaded).
    Prints a one-paragraph summary when verbose.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [os.fspath(p) for p in paths]
    if not files:
        raise ValueError("load_records: no data files given")
    if check_images and image_folder is None:
        raise ValueError("check_images=True needs image_folder")
    rejects = rejects if rejects is not None else RejectLog()
    summary = DataSummary(files=files)
    chunks: list[bytes] = []
    offsets = [0]
    columns = file_ix, entry_ix, lines, num_images, ids = [], [], [], [], []
    for f_i, path in enumerate(files):
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} does not exist")
        for index, line, entry, raw in _read_entries(path):
            summary.entries += 1
            try:
                images = _checked_images(entry, image_folder if check_images else None)
            except SampleError as e:
                rejects.add(Reject(path, index, _entry_id(entry), e.reason, e.detail, line))
                summary.rejects[e.reason] += 1
                continue
            encoded = raw.encode("utf-8")
            chunks.append(encoded)
            offsets.append(offsets[-1] + len(encoded))
            for column, value in zip(columns, (f_i, index, line or 0, len(images), _entry_id(entry))):
                column.append(value)
    n_img = np.asarray(num_images, dtype=np.int32)
    summary.samples = len(ids)
    summary.images = int(n_img.sum())
    summary.text_only = int((n_img == 0).sum())
    if verbose:
        print(summary, file=sys.stderr)
        if rejects.path and rejects.total:
            print(f"  rejects written to {rejects.path}", file=sys.stderr)
    return Records(b"".join(chunks), np.asarray(offsets, dtype=np.int64), files, np.asarray(file_ix, dtype=np.int32),
                   np.asarray(entry_ix, dtype=np.int64), np.asarray(lines, dtype=np.int64), n_img, ids, summary)
