"""ScienceQA (test split), asked as llava/eval/model_vqa_science.py --single-pred-prompt asks it
(scripts/v1_5/eval/sqa.sh) and scored as llava/eval/eval_science_qa.py scores it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..scorers import scienceqa_choice, scienceqa_letter
from .base import EvalDataError, EvalQuestion, Task
from .files import read_json

log = logging.getLogger(__name__)

# model_vqa_science.py --single-pred-prompt appends this line to every question.
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
_OPTIONS = "ABCDE"  # eval_science_qa.py's --options default


class ScienceQA(Task):
    """ScienceQA test: multiple-choice accuracy on all 4241 problems and on those with an image.

    Layout (under --data, LLaVA's playground/data/eval):
      scienceqa/llava_test_CQM-A.json    LLaVA's questions (eval.zip): a JSON list of {"id", "image"?,
                                         "conversations": [{"from": "human", "value"}, ...]}
      scienceqa/images/test/<image>      ScienceQA's test images ("<id>/image.png")
      scienceqa/problems.json, pid_splits.json   ScienceQA's answers and splits (for a local score)
    The user turn is the human value without "<image>", stripped, plus "\\n" + SINGLE_PRED_PROMPT; the
    answers file's "prompt" has "<image>\\n" in front for image questions, as model_vqa_science.py writes
    it (eval_science_qa.py counts a problem as an image problem by that tag). max_new_tokens is 1024, the
    value model_vqa_science.py hard-codes.

    score() follows eval_science_qa.py over pid_splits["test"]: a problem without an answer counts as
    "FAILED" (wrong, and not an image problem); returns accuracy and img_accuracy (percent), and writes
    scienceqa_output.json (correct / incorrect analyses) and scienceqa_result.json (acc, correct, count,
    results, outputs) -- LLaVA's <ckpt>_output.jsonl (one JSON document despite the name) and
    <ckpt>_result.json.
    """

    name = "scienceqa"
    max_new_tokens = 1024
    # LLaVA's MODEL_ZOO.md "SQA" (paper: SQA-IMG), the image-subset accuracy.
    published = {"llava-v1.5-7b": {"img_accuracy": 66.8}, "llava-v1.5-13b": {"img_accuracy": 71.6}}
    split = "test"

    def load(self, data_dir: Path) -> list[EvalQuestion]:
        root = Path(data_dir) / "scienceqa"
        path = root / "llava_test_CQM-A.json"
        entries = read_json(path, list)
        answer_key = self._answer_key(root)
        questions, seen = [], {}
        for i, entry in enumerate(entries):
            where = f"entry {i}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
            try:
                qid, value = entry["id"], entry["conversations"][0]["value"]
            except (KeyError, IndexError, TypeError):
                value = None
            if not isinstance(value, str):
                raise EvalDataError(path, None, f'{where}: expected {{"id", "conversations": [{{"value": "..."}}, ...]}}')
            if qid in seen:
                raise EvalDataError(path, None, f"{where}: duplicate id {qid!r} (first at entry {seen[qid]})")
            seen[qid] = i
            text = value.replace("<image>", "").strip() + "\n" + SINGLE_PRED_PROMPT
            images, prompt = [], text
            if "image" in entry:
                image = root / "images" / "test" / entry["image"]
                if not image.is_file():
                    raise EvalDataError(path, None,
                                        f"{where}: image {entry['image']!r} not found: expected the file {image}")
                images, prompt = [image], "<image>\n" + text
            # Scoring walks the split's problems (a question outside it is logged there, as LLaVA ignores it).
            truth = {} if answer_key is None else {"key": answer_key}
            questions.append(EvalQuestion(qid, text, images, record={"prompt": prompt}, truth=truth))
        return questions

    def _answer_key(self, root: Path) -> dict | None:
        """{"pids": the split's problem ids in order, "problems": {pid: (answer index, number of choices)}},
        shared by every question's truth; None (logged) without problems.json / pid_splits.json."""
        problems_path, splits_path = root / "problems.json", root / "pid_splits.json"
        if not (problems_path.is_file() and splits_path.is_file()):
            log.warning("scienceqa: %s or %s not found: answers will not be scored locally", problems_path, splits_path)
            return None
        splits = read_json(splits_path, dict)
        if not isinstance(splits.get(self.split), list) or not splits[self.split]:
            raise EvalDataError(splits_path, None, f"expected a non-empty list of problem ids under {self.split!r}")
        problems = read_json(problems_path, dict)
        key = {}
        for pid in splits[self.split]:
            prob = problems.get(pid)
            if not (isinstance(prob, dict) and isinstance(prob.get("answer"), int)
                    and isinstance(prob.get("choices"), list)):
                raise EvalDataError(problems_path, None,
                                    f"problem {pid!r} (in {splits_path}): expected answer (int) and choices (list)")
            key[pid] = (prob["answer"], len(prob["choices"]))
        return {"pids": list(splits[self.split]), "problems": key}

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        if len(questions) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
        if not questions or "key" not in questions[0].truth:
            log.warning("scienceqa: no problems.json / pid_splits.json in the data directory: no local score")
            return {}
        key = questions[0].truth["key"]
        given = {str(q.question_id): (q.record["prompt"], a) for q, a in zip(questions, answers)}
        outside = len(given.keys() - key["problems"].keys())
        if outside:
            log.warning("scienceqa: %d answered questions are not in the %r split and are not scored", outside, self.split)
        results: dict[str, list] = {"correct": [], "incorrect": []}
        summary = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
        unanswered = 0
        for pid in key["pids"]:
            answer_idx, num_choices = key["problems"][pid]
            if pid in given:
                prompt, text = given[pid]
            else:  # eval_science_qa.py's placeholder for a problem missing from the answers
                prompt, text = "Unknown", "FAILED"
                unanswered += 1
            pred_idx = scienceqa_choice(text, num_choices)
            analysis = {"question_id": pid, "parsed_ans": scienceqa_letter(text), "ground_truth": _OPTIONS[answer_idx],
                        "question": prompt, "pred": text, "is_multimodal": "<image>" in prompt}
            results["correct" if pred_idx == answer_idx else "incorrect"].append(analysis)
            summary["results"][pid] = pred_idx
            summary["outputs"][pid] = text
        if unanswered:
            log.warning("scienceqa: %d of the %d %r problems have no answer; eval_science_qa.py counts them wrong",
                        unanswered, len(key["pids"]), self.split)
        correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
        img_correct = sum(r["is_multimodal"] for r in results["correct"])
        img_total = img_correct + sum(r["is_multimodal"] for r in results["incorrect"])
        summary.update(acc=100.0 * correct / total, correct=correct, count=total)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "scienceqa_output.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        (output_dir / "scienceqa_result.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        scores = {"accuracy": summary["acc"]}
        if img_total:
            scores["img_accuracy"] = 100.0 * img_correct / img_total
        else:  # eval_science_qa.py divides by zero here
            log.warning("scienceqa: no image problem was answered: no img_accuracy")
        log.info("scienceqa: total %d, correct %d, accuracy %.2f%%, IMG-accuracy %s; wrote %s and %s", total, correct,
                 scores["accuracy"], f"{scores['img_accuracy']:.2f}%" if img_total else "n/a",
                 output_dir / "scienceqa_output.json", output_dir / "scienceqa_result.json")
        return scores
