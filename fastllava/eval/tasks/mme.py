"""MME (perception and cognition yes/no questions), as LLaVA-1.5 evaluates it (scripts/v1_5/eval/mme.sh).

Layout (docs/Evaluation.md): `MME/llava_mme.jsonl` (from LLaVA's eval.zip) and MME's release under
`MME/MME_Benchmark_release_version/<subtask>/`: images and their `<image stem>.txt` ground truth side by side,
or (artwork, celebrity, landmark, posters, scene) `images/` and `questions_answers_YN/`. A ground-truth line
is "<question> Please answer yes or no.<TAB>Yes|No".

llava_mme.jsonl names both questions of an image by the same question_id (the image path). The driver needs
unique ids, so a repeat gets "#2" appended (q.question_id) while the answers-file line keeps LLaVA's id
(record["question_id"]), so LLaVA's convert_answer_to_mme.py reads our answers file unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..scorers import mme_scores
from .base import SHORT_ANSWER, EvalDataError, EvalQuestion, HubSource, Task
from .reading import image_cell, image_file, read_jsonl

log = logging.getLogger(__name__)

YES_NO = "Please answer yes or no."
# The subtasks whose release keeps images in images/ (and ground truth in questions_answers_YN/): LLaVA's ids
# name the image as <subtask>/images/<file>; the Hub's question_id leaves out "images/".
_IMAGES_FOLDER = ("artwork", "celebrity", "landmark", "posters", "scene")


class MME(Task):
    """MME: 14 subtasks of yes/no questions, two per image; scored by MME's calculation.py rules."""

    name = "mme"
    max_new_tokens = 128  # model_vqa_loader.py's default; mme.sh does not change it
    # docs/MODEL_ZOO.md (and the LLaVA-1.5 paper, Table 4): the MME perception score.
    published = {"llava-v1.5-7b": {"perception": 1510.7}, "llava-v1.5-13b": {"perception": 1531.3}}

    # lmms-eval's mme.yaml; its question is MME's ground-truth question ("... Please answer yes or no.").
    hub = HubSource("lmms-lab/MME", "data/test-*.parquet", ("question_id", "image", "question", "answer", "category"))

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "MME"
        path, bench = root / "llava_mme.jsonl", root / "MME_Benchmark_release_version"
        truths: dict[Path, dict[str, str]] = {}
        seen: dict[tuple[str, str], int] = {}
        repeats: dict[str, int] = {}
        questions = []
        for line, obj in read_jsonl(path, required=("question_id", "image", "text")):
            qid, text = str(obj["question_id"]), obj["text"]
            if (qid, text) in seen:
                raise EvalDataError(path, line, f"question {qid!r} {text!r} repeats line {seen[qid, text]}")
            seen[qid, text] = line
            image = image_file(bench, obj["image"], path, line, check=images)
            # convert_answer_to_mme.py: the subtask is the id's first folder, the ground-truth file is the
            # id's file name up to its first dot, plus ".txt".
            category, txt_name = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
            folder = bench / category
            qa_dir = folder / "questions_answers_YN" if (folder / "images").exists() else folder
            gt = truths.get(qa_dir / txt_name)
            if gt is None:
                gt = truths[qa_dir / txt_name] = self._ground_truth(qa_dir / txt_name, path, line)
            question = self._mme_question(text, gt)
            if question not in gt:
                raise EvalDataError(path, line, f"no ground truth for {question!r} in {qa_dir / txt_name}")
            questions.append(_question(obj["question_id"], text, [image], question, gt[question], repeats))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """LLaVA's questions from lmms-lab/MME rows, in row order: LLaVA's prompt is MME's question without
        " Please answer yes or no." plus the short-answer line (as mme.yaml's post_prompt builds it), LLaVA's
        id the row's with "images/" restored, the ground truth the row's answer."""
        repeats: dict[str, int] = {}
        questions = []
        for file, i, row in rows:
            category, qid, question = row["category"], str(row["question_id"]), row["question"]
            if row["answer"] not in ("Yes", "No") or YES_NO not in question:
                raise EvalDataError(file, None, f"row {i}: expected a question ending in {YES_NO!r} and answer Yes "
                                                f"or No, got {question!r}, {row['answer']!r}")
            parts = qid.split("/")
            if category in _IMAGES_FOLDER and len(parts) == 2:
                qid = f"{parts[0]}/images/{parts[1]}"
            text = question.replace(YES_NO, "").strip() + "\n" + SHORT_ANSWER
            image = [image_cell(row["image"], file, i)] if images else []
            questions.append(_question(qid, text, image, question, row["answer"], repeats))
        return questions

    @staticmethod
    def _mme_question(text: str, gt: dict[str, str]) -> str:
        """convert_answer_to_mme.py's way back from LLaVA's prompt to MME's question: drop LLaVA's
        short-answer instruction, append " Please answer yes or no." where absent, and where that is not
        one of the file's questions, try it with two spaces (some MME files have them)."""
        question = text
        if SHORT_ANSWER in question:
            question = question.replace(SHORT_ANSWER, "").strip()
        if YES_NO not in question:
            question = question + " " + YES_NO
            if question not in gt:
                question = question.replace(" " + YES_NO, "  " + YES_NO)
        return question

    @staticmethod
    def _ground_truth(txt: Path, path: Path, line: int) -> dict[str, str]:
        """question -> "Yes"/"No" of one MME ground-truth file (question<TAB>answer per line)."""
        if not txt.is_file():
            raise EvalDataError(path, line, f"ground-truth file {txt} not found")
        out = {}
        for number, text in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
            if not text.strip():
                continue
            fields = text.strip().split("\t")
            if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                raise EvalDataError(txt, number, "expected '<question><TAB>Yes' or '<question><TAB>No'")
            out[fields[0]] = fields[1]
        return out

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """Writes `mme_results/<subtask>.txt` as convert_answer_to_mme.py does (image file, question, ground
        truth, answer; tab-separated; the folder MME's `calculation.py --results_dir` reads) and returns
        perception, cognition and each subtask's score."""
        out = Path(output_dir) / "mme_results"
        out.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {}
        broken = 0
        for q, answer in zip(questions, answers, strict=True):
            t = q.truth
            broken += "\t" in answer or "\n" in answer
            lines.setdefault(t["category"], []).append("\t".join((t["file"], t["question"], t["answer"], answer)) + "\n")
        for category, rows in lines.items():
            (out / f"{category}.txt").write_text("".join(rows), encoding="utf-8")
        if broken:
            log.warning("MME: %d answer(s) contain a tab or newline, which break calculation.py's line format; "
                        "scored here as given", broken)
        log.info("MME: results for calculation.py in %s", out)
        scores = mme_scores([{"category": q.truth["category"], "image": q.truth["image"], "answer": q.truth["answer"],
                              "prediction": a} for q, a in zip(questions, answers)])
        return {"perception": scores["perception"], "cognition": scores["cognition"], **scores["subtasks"]}


def _question(llava_id, text: str, images: list, question: str, answer: str, repeats: dict[str, int]) -> EvalQuestion:
    """One MME question under LLaVA's id (`llava_id`, kept in the answers file), made unique by "#k" for the
    k-th question of an image (`repeats` counts them); category and ground-truth file derived from the id as
    convert_answer_to_mme.py derives them."""
    qid = str(llava_id)
    repeats[qid] = repeats.get(qid, 0) + 1
    return EvalQuestion(
        question_id=qid if repeats[qid] == 1 else f"{qid}#{repeats[qid]}", text=text, images=images,
        record={"question_id": llava_id},
        truth={"category": qid.split("/")[0], "image": qid, "file": qid.split("/")[-1].split(".")[0] + ".txt",
               "question": question, "answer": answer})
