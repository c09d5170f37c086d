"""Reading LLaVA's evaluation files: jsonl question files, JSON documents, image paths. Every error names
the file, the 1-based line where there is one, and what was expected (EvalDataError).

(Named reading.py, not files.py: fastllava/data/files.py reads and validates training data.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .base import EvalDataError

_QUESTION_FIELDS = ("question_id", "image", "text")


def read_jsonl(path: Path, *, what: str = "a jsonl file", required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of each non-blank line; EvalDataError for a missing file, a line that
    is not a JSON object, or one without a `required` key. `what` names the file's role in errors."""
    if not path.is_file():
        raise EvalDataError(path, None, f"file not found (expected {what})")
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise EvalDataError(path, number, f"expected a JSON object per line ({what}): {e.msg}") from None
            if not isinstance(obj, dict):
                raise EvalDataError(path, number, f"expected a JSON object ({what}), got {type(obj).__name__}")
            missing = [key for key in required if key not in obj]
            if missing:
                raise EvalDataError(path, number, f"expected keys {', '.join(required)}; missing {', '.join(missing)}")
            yield number, obj


def read_json(path: Path, kind: type) -> Any:
    """A whole-file JSON document of type `kind`; errors name the file and the line of a syntax error."""
    if not path.is_file():
        raise EvalDataError(path, None, f"file not found (expected a JSON {kind.__name__})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(path, e.lineno, f"expected a JSON document: {e.msg}") from None
    if not isinstance(obj, kind):
        raise EvalDataError(path, None, f"expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def image_file(folder: Path, name: str, path: Path, line: int | None, *, check: bool = True) -> Path:
    """folder / name; with `check` (answering) it must be a file, else EvalDataError naming the question file
    and line. Scoring existing answers passes check=False: it reads no image."""
    image = folder / name
    if check and not image.is_file():
        raise EvalDataError(path, line, f"image {name!r} not found: expected the file {image}")
    return image


def read_questions(path: Path, image_dir: Path, *, key: Callable[[dict], Any] | None = None,
                   what: str = "LLaVA question file", images: bool = True) -> list[tuple[int, dict, Path]]:
    """(line number, record, image path) per line of a LLaVA question jsonl ({"question_id", "image",
    "text", ...}, as model_vqa_loader.py reads it).

    Checks what LLaVA's loader relies on: question_id, image and text present, image and text strings,
    the image file present under `image_dir` (with `images`; see image_file), and `key(record)` (default: question_id) unique in the
    file; a ValueError from `key` becomes an EvalDataError naming the line.
    """
    key = key or (lambda rec: rec["question_id"])
    seen: dict[Any, int] = {}
    rows = []
    for number, rec in read_jsonl(path, what=what, required=_QUESTION_FIELDS):
        for name in ("image", "text"):
            if not isinstance(rec[name], str):
                raise EvalDataError(path, number, f'expected "{name}" to be a string, got {type(rec[name]).__name__}')
        try:
            k = key(rec)
        except ValueError as e:  # the task's key could not be read from the record
            raise EvalDataError(path, number, f"question {rec['question_id']!r}: {e}") from None
        if k in seen:
            raise EvalDataError(path, number, f"duplicate question {k!r} (first on line {seen[k]})")
        seen[k] = number
        rows.append((number, rec, image_file(image_dir, rec["image"], path, number, check=images)))
    return rows


def image_cell(cell, file: Path, row: int):
    """A row's image as read_rows gives it (a hub.HubImage, read and decoded when its prompt is built), for
    EvalQuestion.images; EvalDataError naming the file and row for a null cell."""
    if cell is None:
        raise EvalDataError(file, None, f"row {row}: expected an image cell {{'bytes': ..., 'path': ...}}, got null")
    return cell
