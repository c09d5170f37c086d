"""MMBench and MMBench-CN, as LLaVA-1.5 evaluates them (scripts/v1_5/eval/mmbench.sh, mmbench_cn.sh, which run
llava/eval/model_vqa_mmbench.py with --single-pred-prompt, and scripts/convert_mmbench_for_submission.py).

Layout (docs/Evaluation.md): `mmbench/mmbench_dev_20230712.tsv`; `mmbench_cn/mmbench_dev_cn_20231003.tsv`
(mmbench_cn.sh's folder; `mmbench/`, where docs/Evaluation.md puts it, is tried second). One row per
question: index, question, hint, A-D, answer (dev only), image (base64), category, ... These TSVs already
hold every question several times with its options rotated (index + k * 1_000_000), so LLaVA asks each row
once (round 0; mmbench.sh does not pass --all-rounds). `all_rounds=True` asks every rotation of every row,
as --all-rounds does.

Scores: on a split with answers, CircularEval accuracy computed locally (scorers.mmbench_circular;
without the server's ChatGPT matching, so predictions naming no option count wrong). Always: the submission
table of convert_mmbench_for_submission.py, written as TAB-separated text (`answers_upload/<split>.tsv`)
instead of .xlsx, since pandas/openpyxl are not dependencies (`pandas.read_table(path).to_excel(...)`
makes the .xlsx the server takes).

From the Hub (`--data hub`): lmms-lab/MMBench_EN's and lmms-lab/MMBench_CN's dev splits hold these TSVs' rows,
circular copies included, in the same order; `load_hub` reads them as the TSV's cells (a null is pandas' NaN),
so the questions, rounds, scores and submission table are the layout's.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..scorers import mmbench_circular
from .base import EvalDataError, EvalQuestion, HubSource, LazyImage, Task
from .reading import image_cell

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
SUFFIX = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
# Cells pandas.read_table (which LLaVA reads the TSV with) turns into NaN: its default na_values.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
# Columns convert_mmbench_for_submission.py drops from the annotation table before adding "prediction".
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
# The legacy TSVs' columns, in order: the header of the submission table written for Hub rows.
TSV_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
               "comment", "split")
# What load_hub reads of a Hub row: the prompt's cells, the image, and the submission table's columns.
_HUB_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "image", "split")


def is_none(cell: str | None) -> bool:
    """model_vqa_mmbench.py's is_none on a pandas-read cell: NaN (see PANDAS_NA), or "nan"/"none" in any case."""
    return cell is None or cell in PANDAS_NA or cell.lower() in ("nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (1-based first line, row dict) of a TAB-separated file with quoted multi-line cells."""
    if not path.is_file():
        raise EvalDataError(path, None, "file not found")
    csv.field_size_limit(2**31 - 1)  # base64 images exceed csv's default 128 KiB cell limit
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header:
            raise EvalDataError(path, 1, "expected a header row")
        start = reader.line_num + 1
        for cells in reader:
            if cells:
                if len(cells) != len(header):
                    raise EvalDataError(path, start, f"expected {len(header)} TAB-separated cells, found {len(cells)}")
                rows.append((start, dict(zip(header, cells))))
            start = reader.line_num + 1
    return header, rows


@dataclass(frozen=True)
class _Encoded(LazyImage):
    """A TSV row's image bytes (4,377 rows: kept encoded, decoded when the question's prompt is built)."""

    data: bytes
    path: Path
    line: int

    def open(self) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.data)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, ValueError, OSError) as e:
            raise EvalDataError(self.path, self.line, f"column image: image does not decode ({e})") from None


class MMBench(Task):
    """MMBench (English) dev split, one question per TSV row and rotation."""

    name = "mmbench"
    max_new_tokens = 1024  # model_vqa_mmbench.py passes max_new_tokens=1024 to generate
    split, folders, lang = "mmbench_dev_20230712", ("mmbench",), "en"
    # docs/MODEL_ZOO.md: MM-Bench column (the OpenCompass server's CircularEval accuracy).
    published = {"llava-v1.5-7b": {"circular_accuracy": 64.3}, "llava-v1.5-13b": {"circular_accuracy": 67.7}}
    # lmms-lab's MMBench_EN: its dev split holds the 4,377 rows of mmbench_dev_20230712.tsv, the file LLaVA's
    # numbers use. (lmms-eval's mmbench_en_dev task now reads the "en" config of lmms-lab/MMBench: the 4,329
    # rows of the later 20231003 release, other questions.)
    hub = HubSource("lmms-lab/MMBench_EN", "data/dev-*.parquet", _HUB_COLUMNS)

    def __init__(self, all_rounds: bool = False):
        self.all_rounds = all_rounds

    def _path(self, data_dir: Path) -> Path:
        candidates = [Path(data_dir) / folder / f"{self.split}.tsv" for folder in self.folders]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        path = self._path(data_dir)
        header, rows = read_tsv(path)
        missing = [c for c in ("index", "question", "hint", "A", "B", "image") if c not in header]
        if missing:
            raise EvalDataError(path, 1, "expected columns index, question, hint, A, B, image; "
                                         f"missing {', '.join(missing)}")
        return self._questions(header, [(path, line, "", row, lambda row=row, line=line: self._image(
            row["image"], path, line)) for line, row in rows])

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """The TSV's questions from lmms-lab/MMBench_EN or _CN rows: the same rows (circular copies included,
        index + k * 1_000_000) in the same order, cells as pandas reads the TSV (a null is NaN), so the
        prompts, rounds and submission table are the layout's."""
        items = []
        for file, i, row in rows:
            cells = {c: None if v is None else str(v) for c, v in row.items() if c != "image"}
            image_of = (lambda cell=row["image"], file=file, i=i: image_cell(cell, file, i)) if images else None
            items.append((file, None, f"row {i}: ", cells, image_of))
        return self._questions(TSV_COLUMNS, items)

    def _questions(self, header: Sequence[str], items) -> list[EvalQuestion]:
        """The questions of the TSV's rows, as model_vqa_mmbench.py asks them. `items`: (file, line or None,
        where prefix, {column: cell}, a function giving the row's image or None) per row, in order."""
        self._header, self._uploads = list(header), {}
        questions, seen = [], {}
        for path, line, where, row, image_of in items:
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise EvalDataError(path, line,
                                    f"{where}column index: expected an integer, got {row['index']!r}") from None
            if index in seen:
                raise EvalDataError(path, line, f"{where}index {index} repeats {seen[index]}")
            seen[index] = f"line {line}" if line is not None else f"{Path(path).name} {where.removesuffix(': ')}"
            image = [image_of()] if image_of is not None else []
            # get_options: A, B, C, D up to the first empty one.
            options = []
            for letter in LETTERS:
                if is_none(row.get(letter)):
                    break
                options.append(row[letter])
            answer = None if "answer" not in row or is_none(row["answer"]) else row["answer"]
            if answer is not None and answer not in LETTERS[:len(options)]:
                expected = ", ".join(LETTERS[:len(options)])
                raise EvalDataError(path, line, f"{where}column answer: expected one of {expected}, got {answer!r}")
            upload = {c: ("" if is_none(v) else v) for c, v in row.items() if c not in DROPPED}
            self._uploads[index] = upload
            chars = list(LETTERS[:len(options)])
            for round_id in range(len(options) if self.all_rounds else 1):
                # The prompt of model_vqa_mmbench.py: hint (when there is one), question, "X. option" lines; the
                # options rotate by one each round while the letters shown stay A, B, ...; option_char
                # records which original letter each shown one stands for.
                prompt = row["question"] if is_none(row["hint"]) else row["hint"] + "\n" + row["question"]
                for letter, option in zip(LETTERS, options):
                    prompt += "\n" + letter + ". " + option
                shown = dict(zip(LETTERS, options))
                truth = {"index": index, "options": shown, "upload": upload,
                         "answer": None if answer is None else LETTERS[chars.index(answer)]}
                qid = index if not self.all_rounds else f"{index}/{round_id}"
                questions.append(EvalQuestion(
                    question_id=qid, text=prompt + "\n" + SUFFIX[self.lang], images=image, truth=truth,
                    record={"question_id": index, "round_id": round_id, "prompt": prompt, "options": list(options),
                            "option_char": list(chars)}))
                options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
        return questions

    @staticmethod
    def _image(cell: str, path: Path, line: int) -> _Encoded:
        """The row's image as LLaVA's load_image_from_base64 reads it, kept encoded until its prompt is built;
        its header is read here, so that a cell that is no image is named at load."""
        try:
            data = base64.b64decode(cell)
            Image.open(io.BytesIO(data)).close()
        except (binascii.Error, UnidentifiedImageError, ValueError, OSError) as e:
            raise EvalDataError(path, line, f"column image: expected a base64-encoded image ({e})") from None
        return _Encoded(data, path, line)

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """Writes the submission table; returns {"circular_accuracy"} where the split has answers, else {}."""
        if len(questions) != len(answers):
            raise ValueError(f"{self.name}: {len(questions)} questions but {len(answers)} answers")
        self._write_upload(questions, answers, Path(output_dir))
        scored = [(q, a) for q, a in zip(questions, answers) if q.truth["answer"] is not None]
        if not scored:
            log.info("%s: the split has no answers; the submission table is the result", self.name)
            return {}
        if len(scored) < len(questions):
            log.warning("%s: %d question(s) without an answer in the TSV are not scored",
                        self.name, len(questions) - len(scored))
        rows = [{"index": q.truth["index"], "answer": q.truth["answer"], "prediction": a, **q.truth["options"]}
                for q, a in scored]
        return {"circular_accuracy": mmbench_circular(rows)}

    def _write_upload(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> None:
        """convert_mmbench_for_submission.py's table: the TSV's rows without hint, category, source, image,
        comment, l2-category, with "prediction" inserted as the 7th column; a row's prediction is its last
        round's answer (LLaVA's loop overwrites earlier rounds), empty when it has none."""
        header = getattr(self, "_header", None) or ["index", "question", "A", "B", "C", "D", "answer"]
        columns = [c for c in header if c not in DROPPED]
        columns.insert(min(6, len(columns)), "prediction")
        # Every TSV row, in order, as LLaVA's table has them (from load(); else the answered ones).
        rows = {index: dict(upload) for index, upload in getattr(self, "_uploads", {}).items()}
        for q, a in zip(questions, answers):
            rows.setdefault(q.truth["index"], dict(q.truth["upload"]))["prediction"] = a
        out = output_dir / "answers_upload" / f"{self.split}.tsv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for row in rows.values():
                writer.writerow([row.get(c, "") for c in columns])
        log.info("%s: submission table (TSV; the server takes it as .xlsx) in %s", self.name, out)


class MMBenchCN(MMBench):
    """MMBench-CN dev split: Chinese questions, and model_vqa_mmbench.py's --lang cn instruction."""

    name = "mmbench_cn"
    split, folders, lang = "mmbench_dev_cn_20231003", ("mmbench_cn", "mmbench"), "cn"
    published = {"llava-v1.5-7b": {"circular_accuracy": 58.3}, "llava-v1.5-13b": {"circular_accuracy": 63.6}}
    # lmms-eval's mmbench_cn task reads the "cn" config of lmms-lab/MMBench; lmms-lab/MMBench_CN holds the same
    # 4,329 dev rows (mmbench_dev_cn_20231003.tsv's) as one default config.
    hub = HubSource("lmms-lab/MMBench_CN", "data/dev-*.parquet", _HUB_COLUMNS)
