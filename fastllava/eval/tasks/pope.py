"""POPE (object hallucination on COCO val2014), scored as LLaVA's llava/eval/eval_pope.py.

Questions as scripts/v1_5/eval/pope.sh passes them to model_vqa_loader.py (max_new_tokens 128); each
question's "category" names its split, and its label is the line at the same position among that split's
questions in POPE's coco/coco_pope_<split>.json -- eval_pope.py pairs answers and labels by position.

The labels must be the release LLaVA's numbers use: POPE's repository at commit e3e3926 (LLaVA's
docs/Evaluation.md links output/coco there); POPE's later files list other questions, which the line-by-line
check below reports as a mismatch naming that release.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..scorers import pope_metrics
from .base import SHORT_ANSWER, EvalDataError, EvalQuestion, HubSource, Task
from .reading import image_cell, read_jsonl, read_questions

log = logging.getLogger(__name__)

# Where LLaVA's docs/Evaluation.md sends users for the label files its published POPE numbers were scored on.
LABEL_RELEASE = ("POPE's repository at commit e3e3926 (https://github.com/AoiDragon/POPE/tree/"
                 "e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco), the release LLaVA's docs/Evaluation.md names")

_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# LLaVA's llava_pope_test.jsonl numbers each split's questions from these offsets (adversarial 1.., random
# 10000001.., popular 20000001..) and lists the splits in this order; the Hub rows number them 1.. per split.
_LLAVA_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}


class POPE(Task):
    """POPE's three COCO splits (adversarial, popular, random).

    Layout (under --data, LLaVA's playground/data/eval):
      pope/llava_pope_test.jsonl           LLaVA's questions (eval.zip), "category" = split
      pope/val2014/<image>                 COCO val2014 images
      pope/coco/coco_pope_<split>.json     POPE's labels, one {"question_id", "image", "text", "label"} per
                                           line, in the order of that split's questions
    score() returns, in percent, "<split>_<metric>" per split (accuracy, precision, recall, f1, yes_ratio, as
    eval_pope.py prints them) and each metric averaged over the scored splits (the paper reports the
    average F1 of the three). A split without its label file is logged and left out.
    """

    name = "pope"
    max_new_tokens = 128
    # LLaVA-1.5 paper (Table 4) / MODEL_ZOO.md: F1 averaged over the three splits.
    published = {"llava-v1.5-7b": {"f1": 85.9}, "llava-v1.5-13b": {"f1": 85.9}}
    subsets = ("adversarial", "popular", "random")  # all three are answered and scored: no --split
    # lmms-eval's pope.yaml: 9,000 rows (3,000 per split, POPE's current files), where LLaVA's layout has
    # 8,910 questions of the e3e3926 release: the same protocol on a slightly different question set.
    hub = HubSource("lmms-lab/POPE", "data/test-*.parquet",
                    ("question_id", "question", "answer", "image_source", "image", "category"))

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "pope"
        path = root / "llava_pope_test.jsonl"
        rows = read_questions(path, root / "val2014", images=images)
        by_split: dict[str, list] = {}
        for number, rec, image in rows:
            if not isinstance(rec.get("category"), str):
                raise EvalDataError(path, number, 'expected a "category" field naming the POPE split')
            by_split.setdefault(rec["category"], []).append((number, rec, image))
        labels = {split: self._labels(root / "coco" / f"coco_pope_{split}.json", path, split, items)
                  for split, items in by_split.items()}
        questions = []
        for number, rec, image in rows:
            split = rec["category"]
            truth = {"split": split}
            if labels[split] is not None:
                truth["label"] = labels[split][number]
            questions.append(EvalQuestion(rec["question_id"], rec["text"], [image], truth=truth))
        return questions

    @staticmethod
    def _labels(path: Path, question_file: Path, split: str, items: list) -> dict[int, str] | None:
        """question-file line -> label for one split, paired by position as eval_pope.py pairs them; the
        label line's text and image are checked against the question so that a shifted file is an error."""
        if not path.is_file():
            log.warning("pope: %s not found: split %r will not be scored", path, split)
            return None
        lines = list(read_jsonl(path, what=f"POPE labels of split {split!r}"))
        if len(lines) != len(items):
            raise EvalDataError(path, None, f"expected one label per {split!r} question of {question_file} "
                                            f"({len(items)}), found {len(lines)} lines; use the labels of "
                                            f"{LABEL_RELEASE}")
        out = {}
        for (number, obj), (q_number, rec, _) in zip(lines, items):
            if obj.get("label") not in ("yes", "no"):
                raise EvalDataError(path, number, f'expected "label": "yes" or "no", got {obj.get("label")!r}')
            if obj.get("image") != rec["image"] or not rec["text"].startswith(str(obj.get("text"))):
                raise EvalDataError(path, number, f"expected the label of {question_file} line {q_number} "
                                                  f"({rec['image']}: {rec['text'].splitlines()[0]!r}), got "
                                                  f"{obj.get('image')}: {obj.get('text')!r}: these labels are "
                                                  f"not those of LLaVA's questions; use {LABEL_RELEASE}")
            out[q_number] = obj["label"]
        return out

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """LLaVA's questions from lmms-lab/POPE rows: id offset by split as LLaVA numbers them, the question
        with LLaVA's short-answer line (as pope.yaml's post_prompt too), the row's answer as the label; in
        LLaVA's order (by id: adversarial, random, popular)."""
        questions = []
        for file, i, row in rows:
            split, label = row["category"], str(row["answer"]).strip().lower()
            if split not in _LLAVA_ID_OFFSET or label not in ("yes", "no"):
                raise EvalDataError(file, None, f"row {i}: expected category one of {', '.join(self.subsets)} and "
                                                f"answer yes or no, got {split!r}, {row['answer']!r}")
            try:
                qid = _LLAVA_ID_OFFSET[split] + int(row["question_id"])
            except ValueError:
                raise EvalDataError(file, None, f"row {i}: expected a numeric question_id, got "
                                                f"{row['question_id']!r}") from None
            image = [image_cell(row["image"], file, i)] if images else []
            questions.append(EvalQuestion(qid, f"{row['question'].strip()}\n{SHORT_ANSWER}", image,
                                          truth={"split": split, "label": label}))
        return sorted(questions, key=lambda q: q.question_id)

    def unanswered(self, question: EvalQuestion) -> str:
        """The answer opposite to the label (any text reads as yes or no, so none is wrong for both)."""
        label = question.truth.get("label")
        return "" if label is None else "no" if label == "yes" else "yes"

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        if len(questions) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
        per_split: dict[str, tuple[list, list]] = {}
        for q, a in zip(questions, answers):
            if "label" in q.truth:
                preds, labels = per_split.setdefault(q.truth["split"], ([], []))
                preds.append(a)
                labels.append(q.truth["label"])
        unscored = sorted({q.truth["split"] for q in questions} - per_split.keys())
        if unscored:
            log.warning("pope: no labels for split(s) %s: not scored", ", ".join(unscored))
        by_split: dict[str, dict[str, float]] = {}
        for split in sorted(per_split, key=lambda s: (s not in self.subsets, s)):
            m = by_split[split] = pope_metrics(*per_split[split])
            # eval_pope.py's summary line order: F1, accuracy, precision, recall, yes ratio (as fractions).
            log.info("pope: %s (%d samples): F1 %.3f, accuracy %.3f, precision %.3f, recall %.3f, yes ratio %.3f",
                     split, len(per_split[split][0]),
                     *(m[k] / 100 for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")))
        if not by_split:
            return {}
        if set(by_split) != set(self.subsets):
            log.warning("pope: averages are over %s only; the paper averages all three splits", ", ".join(by_split))
        # The averages first: "f1" is the number the paper reports.
        scores = {k: sum(m[k] for m in by_split.values()) / len(by_split) for k in _METRICS}
        for split, m in by_split.items():
            scores.update({f"{split}_{k}": m[k] for k in _METRICS})
        return scores
