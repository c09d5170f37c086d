"""What an evaluation task is: questions read from LLaVA's layout, and a scorer for the answers.

A task reads its question file(s) and images exactly as LLaVA's evaluation documents them
(`playground/data/eval/<task>/...`), turns each into an EvalQuestion, and after generation scores the
answers (writing any submission file next to them). The driver (`python -m fastllava.eval`) owns
everything in between: prompts in the model's template (LLaVA-1.5's `vicuna_v1`), images padded to square,
greedy decoding, sharding over ranks and the answers file in LLaVA's jsonl format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from PIL import Image



# The instruction LLaVA's short-answer question files append to each question (VQAv2, GQA, VizWiz, MME...).
SHORT_ANSWER = "Answer the question using a single word or phrase."


class EvalDataError(ValueError):
    """Bad evaluation input; the message names the file, the line (1-based, where there is one) and what
    was expected."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        where = f"{path}" if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


@dataclass(frozen=True)
class HubJoin:
    """Rows of another config of the same repository that a task's rows reference by key (GQA keeps its
    images in testdev_balanced_images, one row per image, referenced by each question's imageId): read_rows
    copies `columns` of the row whose `key` equals a row's `on` into that row."""

    pattern: str
    key: str
    on: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class HubSource:
    """Where a task's rows live on the Hub (fastllava/eval/hub.py reads them): the dataset repo lmms-eval's
    task file names, the glob of its test split's parquet files in that repo, the columns the task reads,
    and the config joined to them where the rows hold only a reference (`join`)."""

    repo: str
    pattern: str
    columns: tuple[str, ...]
    join: HubJoin | None = None


class LazyImage:
    """An image kept encoded, or where it lies, until a prompt needs it: `open()` gives it decoded, RGB, and
    raises EvalDataError naming where it came from if it does not decode (hub.HubImage, MMBench's cells)."""

    def open(self) -> Image.Image:
        raise NotImplementedError


@dataclass
class EvalQuestion:
    """One question to answer.

    question_id: as it stands in the question file (int or str); unique within the task.
    text: the user turn WITHOUT image tags, the task's instruction suffix included exactly as LLaVA's
      evaluation script builds it (e.g. "...\nAnswer the question using a single word or phrase.").
      The driver puts one "<image>\n" per image in front, as LLaVA's scripts do.
    images: one entry per image, in order: a path to an image file, or a LazyImage (a Hub row's image left in
      its parquet file, MMBench's encoded cells); the driver decodes each when it builds the question's
      prompt, so a task's questions hold no decoded pixels (a PIL image is accepted too, for callers that
      have one). Empty for a text-only question.
    record: extra fields of this question's line in the answers file, next to the driver's
      question_id / prompt / text / answer_id / model_id / metadata (e.g. MMBench's round_idx, options,
      option_char). "prompt" here overrides what is written as "prompt" (default: `text`).
    truth: what the scorer needs (ground-truth answers, category, ...); never written to the answers.
    """

    question_id: Any
    text: str
    images: list[Path | LazyImage | Image.Image] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)


class Task:
    """A benchmark. Subclasses set the class attributes and implement `load` and `score`."""

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]  # LLaVA's value for this task's evaluation script
    # Published LLaVA-1.5 numbers (LLaVA's MODEL_ZOO / paper Table 4), metric name -> value, per model:
    # {"llava-v1.5-7b": {...}, "llava-v1.5-13b": {...}}; metric names as `score` returns them.
    published: ClassVar[dict[str, dict[str, float]]] = {}
    # The splits `--split` may name, the first being the default (LLaVA's); empty: the task has one.
    # A task with splits takes `split` in its constructor.
    splits: ClassVar[tuple[str, ...]] = ()
    # The Hub dataset (lmms-eval's) `--data hub` reads, for a task that implements load_hub; None: layout only.
    # A task with splits may set it per instance in its constructor, to the chosen split's files.
    hub: ClassVar[HubSource | None] = None

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        """All questions, in question-file order. Raises EvalDataError (file, line, what was expected) for a
        missing file, a duplicate question id, a malformed line, and with `images` (answering) a missing
        image file. Scoring an existing answers file loads with images=False: it needs no image."""
        raise NotImplementedError

    def load_hub(self, rows: list[tuple[Path, int, dict]], *, images: bool = True) -> list[EvalQuestion]:
        """The questions `load` gives for the same questions, from the rows of `hub`'s parquet files
        ((file, row, {column: value}), fastllava/eval/hub.py), each image the row's HubImage."""
        raise NotImplementedError

    def unanswered(self, question: EvalQuestion) -> str:
        """The answer scored for a question an answers file lacks when it counts as wrong
        (`--missing-as-wrong`): empty, which every local scorer counts wrong (POPE overrides it)."""
        return ""

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """Metrics of `answers` (answers[i] answers questions[i]), as LLaVA computes them; writes any
        submission/converted file under output_dir and names it in the log. Returns {} where nothing can be
        scored locally (a test split without answers: the submission file is the result)."""
        raise NotImplementedError
