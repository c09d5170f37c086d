"""SEED-Bench (v1: image and video multiple-choice questions), as LLaVA-1.5 evaluates it
(scripts/v1_5/eval/seed.sh: llava/eval/model_vqa_loader.py, then scripts/convert_seed_for_submission.py).

Layout (docs/Evaluation.md) under `seed_bench/`: `llava-seed-bench.jsonl` (LLaVA's question file from
eval.zip: question_id, image, text with the options and "Answer with the option's letter from the given
choices directly."), `SEED-Bench.json` (the official annotation: answers, data_type, question types),
`SEED-Bench-image/` and `SEED-Bench-video-image/`. A video question is asked about one frame, the middle
one, extracted beforehand by LLaVA's `extract_video_frames.py` as `SEED-Bench-video-image/<question type
id>_<question id>.png`; the question file already points there.

Scores as convert_seed_for_submission.py: right when the answer is exactly the letter; accuracy over every
question of SEED-Bench.json (image, video and all), unanswered ones counting as wrong. Writes its upload
file (`answers_upload/seed.jsonl`: question_id, prediction) for the official leaderboard notebook.

From the Hub (`--data hub`, lmms-lab/SEED-Bench): the image questions only. Its video rows hold frames of
their own choosing, not the middle frame LLaVA's extract_video_frames.py gives, so they are skipped (counted
in the log) and every metric, "accuracy" included, is over the image questions: compare image_accuracy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..scorers import seed_accuracy
from .base import EvalDataError, EvalQuestion, HubSource, Task
from .reading import image_cell, image_file, read_jsonl
from .scienceqa import SINGLE_PRED_PROMPT

log = logging.getLogger(__name__)

# SEED-Bench.json's "question_type" (SEED-Bench's DATASET.md), id -> name: the Hub rows carry only the id.
QUESTION_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Location", 4: "Instance Attributes",
                  5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
                  9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction",
                  12: "Procedure Understanding"}


class SEED(Task):
    """SEED-Bench: 19K four-option questions over 12 dimensions (9 on images, 3 on videos)."""

    name = "seed"
    max_new_tokens = 128  # model_vqa_loader.py's default; seed.sh does not change it
    # docs/MODEL_ZOO.md "SEED": accuracy over all questions, image and video (SEED-Bench's leaderboard lists
    # LLaVA-1.5-13B at 61.6 overall, 68.2 image, 42.7 video).
    published = {"llava-v1.5-7b": {"accuracy": 58.6}, "llava-v1.5-13b": {"accuracy": 61.6}}
    # lmms-eval's seedbench.yaml: SEED-Bench v1's test split, one row per question, "image" a list of images
    # (one for an image question).
    hub = HubSource("lmms-lab/SEED-Bench", "data/test-*.parquet",
                    ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
                     "question_type_id", "image"))

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "seed_bench"
        annotation = self._annotation(root / "SEED-Bench.json")
        self._all = annotation
        path = root / "llava-seed-bench.jsonl"
        questions, seen = [], {}
        for line, obj in read_jsonl(path, required=("question_id", "image", "text")):
            key = str(obj["question_id"])
            if key in seen:
                raise EvalDataError(path, line, f"question_id {obj['question_id']!r} repeats line {seen[key]}")
            seen[key] = line
            if key not in annotation:
                raise EvalDataError(path, line, f"question_id {obj['question_id']!r} is not in SEED-Bench.json")
            image = image_file(root, obj["image"], path, line, check=images)
            questions.append(EvalQuestion(question_id=obj["question_id"], text=obj["text"], images=[image],
                                          truth=annotation[key]))
        unasked = len(annotation) - len(questions)
        if unasked:
            log.warning("seed: %d question(s) of SEED-Bench.json are not in %s; they count as wrong, as in LLaVA",
                        unasked, path.name)
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """llava-seed-bench.jsonl's image questions from lmms-lab/SEED-Bench rows, in row order: LLaVA's prompt
        (question, "A. ..." to "D. ...", the instruction; lmms-eval's seed_doc_to_text builds the same), the
        row's single image, its answer and dimension; the video rows skipped and counted (module docstring)."""
        questions, annotation, videos = [], {}, 0
        for file, i, row in rows:
            if row["data_type"] != "image":
                videos += 1
                continue
            key, type_id = str(row["question_id"]), row["question_type_id"]
            if key in annotation:
                raise EvalDataError(file, None, f"row {i}: question_id {key!r} repeats an earlier row")
            if type_id not in QUESTION_TYPES or row["answer"] not in ("A", "B", "C", "D"):
                raise EvalDataError(file, None, f"row {i}: expected question_type_id 1-12 and answer A-D, got "
                                                f"{type_id!r}, {row['answer']!r}")
            cells = row["image"] or []
            if len(cells) != 1:
                raise EvalDataError(file, None, f"row {i}: expected one image for an image question, got {len(cells)}")
            text = row["question"] + "".join(f"\n{letter}. {row['choice_' + letter.lower()]}" for letter in "ABCD")
            annotation[key] = {"question_id": row["question_id"], "answer": row["answer"], "data_type": "image",
                               "question_type": QUESTION_TYPES[type_id]}
            questions.append(EvalQuestion(question_id=row["question_id"], text=f"{text}\n{SINGLE_PRED_PROMPT}",
                                          images=[image_cell(cells[0], file, i)] if images else [],
                                          truth=annotation[key]))
        self._all = annotation
        if videos:
            log.warning("seed: %d video question(s) of the Hub rows skipped (no middle frame as LLaVA extracts it); "
                        "the scores are over the %d image questions: compare image_accuracy, not the published "
                        "all-question accuracy", videos, len(questions))
        return questions

    @staticmethod
    def _annotation(path: Path) -> dict[str, dict]:
        """str(question_id) -> {"question_id" (as the annotation has it), "answer", "data_type",
        "question_type"} for every question of SEED-Bench.json, in its order."""
        if not path.is_file():
            raise EvalDataError(path, None, "file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {type_id: name for name, type_id in data["question_type"].items()}
            out = {}
            for q in data["questions"]:
                out[str(q["question_id"])] = {"question_id": q["question_id"], "answer": q["answer"],
                                              "data_type": q["data_type"], "question_type": names[q["question_type_id"]]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise EvalDataError(path, None, "expected SEED-Bench's annotation: {\"question_type\": {name: id}, "
                                            "\"questions\": [{question_id, answer, data_type, question_type_id}]} "
                                            f"({type(e).__name__}: {e})") from None
        return out

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """accuracy (all), image_accuracy, video_accuracy and one accuracy per dimension, in percent."""
        if len(questions) != len(answers):
            raise ValueError(f"seed: {len(questions)} questions but {len(answers)} answers")
        given = {str(q.question_id): a for q, a in zip(questions, answers)}
        annotation = getattr(self, "_all", None)
        if annotation is None:  # score() without load(): only the questions at hand are known
            log.warning("seed: SEED-Bench.json not loaded; accuracy over the %d questions given", len(questions))
            annotation = {str(q.question_id): q.truth for q in questions}
        missing = sum(key not in given for key in annotation)
        if missing:
            log.warning("seed: %d of %d questions have no answer and count as wrong (convert_seed_for_submission.py)",
                        missing, len(annotation))
        out = Path(output_dir) / "answers_upload" / "seed.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for key, truth in annotation.items():
                if key in given:
                    f.write(json.dumps({"question_id": truth["question_id"], "prediction": given[key]}) + "\n")
        log.info("seed: upload file in %s", out)
        return seed_accuracy({**truth, "prediction": given.get(key)} for key, truth in annotation.items())
