"""ScienceQA (test split), asked as llava/eval/model_vqa_science.py asks it and scored as
llava/eval/eval_science_qa.py scores it; optionally with the ScienceQA paper's per-class table and the LLaVA
paper's "GPT-4 as the judge" ensemble (llava/eval/eval_science_qa_gpt4_requery.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..scorers import scienceqa_breakdown, scienceqa_choice, scienceqa_ensemble, scienceqa_letter
from .base import EvalDataError, EvalQuestion, HubSource, Task
from .reading import image_cell, read_json, read_jsonl

if TYPE_CHECKING:
    from ..judge import Judge

log = logging.getLogger(__name__)

# model_vqa_science.py --single-pred-prompt appends this line to every question.
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
_OPTIONS = "ABCDE"  # eval_science_qa.py's --options default
DEFAULT_FORMAT = "CQM-A"  # LLaVA-1.5's question file (scripts/v1_5/eval/sqa.sh)

# "GPT-4 as the judge" (LLaVA paper, section 5.2): where the model and a language-only model answer
# differently, the judge gets the question and both answers and gives its own final answer. LLaVA's repository
# holds only the script that combines the three answer files, not the prompt of the second query; this one is
# ours, written to ask exactly that and to end in the sentence eval_science_qa.py parses.
JUDGE_SYSTEM = "You are a careful science teacher who decides the correct option of multiple-choice questions."
JUDGE_INSTRUCTION = (
    "The two answers disagree. Considering the question and both answers, decide which option is correct. "
    "Explain briefly, then end your reply with the sentence \"The answer is X.\" where X is the letter of the "
    "correct option.")


class ScienceQA(Task):
    """ScienceQA test: multiple-choice accuracy on all 4241 problems and on those with an image.

    `question_format` picks the protocol. "CQM-A" (default): LLaVA-1.5's (scripts/v1_5/eval/sqa.sh), the
    file below asked with --single-pred-prompt. Any other format FMT (e.g. "QCM-LEA", the LLaVA paper's
    fine-tuned model, LLaVA's docs/ScienceQA.md): scienceqa/llava_test_FMT.json asked as is, as
    model_vqa_science.py without --single-pred-prompt does (python -m fastllava.data.scienceqa writes both).

    `breakdown`: score() also returns the ScienceQA paper's table columns (NAT, SOC, LAN, TXT, IMG, NO,
    G1-6, G7-12; scorers.scienceqa_subsets), over the same problems as `accuracy`.

    `judge` + `language_only` (a file of a language-only model's answers: LLaVA's {"outputs": {pid: text}}
    result json, e.g. GPT-4's, or an answers jsonl of {"question_id", "text"} lines): score() also returns
    the "GPT-4 as the judge" ensemble as judged_* metrics (scorers.scienceqa_ensemble), the language-only
    accuracy as language_only_accuracy, and writes scienceqa_judge.jsonl (one line per judged problem) and
    scienceqa_judged_result.json (eval_science_qa_gpt4_requery.py's output-result layout).

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

    From the Hub (`--data hub`, load_hub): the 2,017 image problems of lmms-lab/ScienceQA (ScienceQA-IMG),
    CQM-A only, answer key from the rows, question ids "hub-<n>" (the rows have no pid).
    """

    name = "scienceqa"
    max_new_tokens = 1024
    # LLaVA's MODEL_ZOO.md "SQA" (paper: SQA-IMG), the image-subset accuracy.
    # The LLaVA paper (LLaVA-13B fine-tuned on ScienceQA, QCM-LEA): 90.92 alone, 92.53 with GPT-4 as the judge.
    published = {"llava-v1.5-7b": {"img_accuracy": 66.8}, "llava-v1.5-13b": {"img_accuracy": 71.6},
                 "llava-13b-sqa (paper)": {"accuracy": 90.92, "judged_accuracy": 92.53}}
    split = "test"
    # lmms-eval's scienceqa_img.yaml: the 2,017 test problems with an image, the problems img_accuracy is
    # over. The rows carry no problem id (see load_hub); lecture and solution are for the judge's question.
    hub = HubSource("lmms-lab/ScienceQA", "ScienceQA-IMG/test-*.parquet",
                    ("image", "question", "choices", "answer", "hint", "subject", "grade", "lecture", "solution"))

    def __init__(self, *, question_format: str = DEFAULT_FORMAT, breakdown: bool = False, judge: Judge | None = None,
                 language_only: str | Path | None = None):
        from ...data.scienceqa import check_format

        check_format(question_format)
        if (judge is None) != (language_only is None):
            raise ValueError("scienceqa: the judge ensemble needs both a judge and a language-only answers file")
        self.question_format, self.breakdown = question_format, breakdown
        self.judge, self.language_only = judge, None if language_only is None else Path(language_only)
        self._language_answers: dict[str, str] | None = None

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "scienceqa"
        path = root / f"llava_test_{self.question_format}.json"
        entries = read_json(path, list)
        answer_key = self._answer_key(root)
        if self.language_only is not None:
            if answer_key is None:
                raise EvalDataError(root / "problems.json", None, "the judge ensemble needs problems.json and "
                                                                  "pid_splits.json: file not found")
            self._language_answers = read_language_only(self.language_only, answer_key["pids"])
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
            text = value.replace("<image>", "").strip()
            if self.question_format == DEFAULT_FORMAT:
                text += "\n" + SINGLE_PRED_PROMPT
            files, prompt = [], text
            if "image" in entry:
                image = root / "images" / "test" / entry["image"]
                if images and not image.is_file():
                    raise EvalDataError(path, None,
                                        f"{where}: image {entry['image']!r} not found: expected the file {image}")
                files, prompt = [image], "<image>\n" + text
            # Scoring walks the split's problems (a question outside it is logged there, as LLaVA ignores it).
            truth = {} if answer_key is None else {"key": answer_key}
            questions.append(EvalQuestion(qid, text, files, record={"prompt": prompt}, truth=truth))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """LLaVA's CQM-A questions from lmms-lab/ScienceQA's ScienceQA-IMG rows, and the answer key from the
        rows themselves (no problems.json needed).

        The rows carry no ScienceQA problem id, and nothing published ties their order to pid_splits.json, so
        a question's id is "hub-<n>", its 0-based position in the split (shards in order): stable for one
        revision of the dataset, never mistaken for a pid. The prompt is that of LLaVA's file for an image
        problem: "Context: <hint>" (the line left out for an empty hint, as lmms-eval's sqa_doc_to_text does),
        the question, "A. <choice>" lines, then SINGLE_PRED_PROMPT. Scores are the layout's over the same
        problems; as the split has only image problems, accuracy equals img_accuracy (LLaVA's accuracy over
        all 4,241 test problems needs the layout). The judge ensemble's language-only answers are keyed by
        these ids."""
        if self.question_format != DEFAULT_FORMAT:
            raise ValueError(f"scienceqa: the Hub rows give LLaVA-1.5's {DEFAULT_FORMAT} questions only; format "
                             f"{self.question_format} needs the layout (python -m fastllava.data.scienceqa)")
        questions, pids, problems, entries = [], [], {}, {}
        for n, (file, i, row) in enumerate(rows):
            choices, answer = row["choices"], row["answer"]
            if not (isinstance(choices, list) and 2 <= len(choices) <= len(_OPTIONS) and isinstance(answer, int)
                    and 0 <= answer < len(choices) and row["image"] is not None):
                raise EvalDataError(file, None, f"row {i}: expected an image, 2-5 choices and an answer index among "
                                                f"them, got {len(choices or [])} choices, answer {answer!r}")
            pid, hint = f"hub-{n}", (row["hint"] or "").strip()
            text = (f"Context: {hint}\n" if hint else "") + row["question"] + "".join(
                f"\n{_OPTIONS[k]}. {c}" for k, c in enumerate(choices))
            text = text.strip() + "\n" + SINGLE_PRED_PROMPT
            pids.append(pid)
            problems[pid] = (answer, len(choices))
            # A problems.json entry: what scienceqa_subsets (IMG, hint, subject, grade) and the judge read.
            entries[pid] = {**row, "image": "image.png"}
            questions.append(EvalQuestion(pid, text, [image_cell(row["image"], file, i)] if images else [],
                                          record={"prompt": "<image>\n" + text}))
        key = {"pids": pids, "problems": problems, "entries": entries}
        if self.language_only is not None:
            self._language_answers = read_language_only(self.language_only, pids)
        for q in questions:
            q.truth = {"key": key}
        return questions

    def _answer_key(self, root: Path) -> dict | None:
        """{"pids": the split's problem ids in order, "problems": {pid: (answer index, number of choices)},
        "entries": {pid: its problems.json entry}}, shared by every question's truth; None (logged) without
        problems.json / pid_splits.json."""
        problems_path, splits_path = root / "problems.json", root / "pid_splits.json"
        if not (problems_path.is_file() and splits_path.is_file()):
            log.warning("scienceqa: %s or %s not found: answers will not be scored locally", problems_path, splits_path)
            return None
        splits = read_json(splits_path, dict)
        if not isinstance(splits.get(self.split), list) or not splits[self.split]:
            raise EvalDataError(splits_path, None, f"expected a non-empty list of problem ids under {self.split!r}")
        problems = read_json(problems_path, dict)
        key, entries = {}, {}
        for pid in splits[self.split]:
            prob = problems.get(pid)
            if not (isinstance(prob, dict) and isinstance(prob.get("answer"), int)
                    and isinstance(prob.get("choices"), list)):
                raise EvalDataError(problems_path, None,
                                    f"problem {pid!r} (in {splits_path}): expected answer (int) and choices (list)")
            if self.breakdown and not all(isinstance(prob.get(k), str) for k in ("subject", "grade")):
                raise EvalDataError(problems_path, None, f"problem {pid!r}: the per-class table needs subject and "
                                                         f"grade (strings, e.g. 'natural science', 'grade5')")
            key[pid] = (prob["answer"], len(prob["choices"]))
            entries[pid] = prob
        return {"pids": list(splits[self.split]), "problems": key, "entries": entries}

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
        choices: dict[str, int] = {}
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
            choices[pid] = pred_idx
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
        entries = key["entries"]
        if self.breakdown:
            scores.update(scienceqa_breakdown(entries, {p: choices[p] == key["problems"][p][0] for p in choices}))
        if self.judge is not None:
            scores.update(self._judged(key, choices, {p: given.get(p, ("Unknown", "FAILED"))[1] for p in choices},
                                       output_dir))
        return scores

    def _judged(self, key: dict, choices: dict[str, int], texts: dict[str, str], output_dir: Path) -> dict[str, float]:
        """The "GPT-4 as the judge" ensemble over the split: the judge is asked where the model's and the
        language-only model's parsed choices differ; judged_* metrics, files written to output_dir."""
        from ...data.scienceqa import build_example, problem_error

        assert self._language_answers is not None, "load() reads the language-only answers"
        entries, final, lang_correct, lines = key["entries"], {}, {}, []
        for pid in key["pids"]:
            answer_idx, num_choices = key["problems"][pid]
            language = self._language_answers[pid]
            lang_idx = scienceqa_choice(language, num_choices)
            lang_correct[pid] = lang_idx == answer_idx
            if lang_idx == choices[pid]:
                final[pid] = choices[pid]
                continue
            problem = entries[pid]
            reason = problem_error(problem)
            if reason is not None:
                raise EvalDataError("problems.json", None, f"problem {pid!r}: cannot show it to the judge: {reason}")
            question = build_example(problem, "CQM-A")[0]
            reply = self.judge.chat([{"role": "system", "content": JUDGE_SYSTEM},
                                     {"role": "user", "content": judge_message(question, texts[pid], language)}],
                                    temperature=0.0, max_tokens=1024)
            judge_idx = scienceqa_choice(reply, num_choices)
            final[pid] = scienceqa_ensemble(choices[pid], lang_idx, judge_idx)
            lines.append({"question_id": pid, "model_answer": texts[pid], "language_only_answer": language,
                          "judge_reply": reply, "judge_choice": judge_idx, "final_choice": final[pid],
                          "ground_truth": answer_idx})
        correct = {pid: final[pid] == key["problems"][pid][0] for pid in key["pids"]}
        n, right = len(correct), sum(correct.values())
        with open(output_dir / "scienceqa_judge.jsonl", "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        (output_dir / "scienceqa_judged_result.json").write_text(json.dumps(
            {"acc": 100.0 * right / n, "correct": right, "count": n, "results": final}, indent=2), encoding="utf-8")
        unparsed = sum(1 for line in lines if line["judge_choice"] < 0)
        log.info("scienceqa: judge %s asked on %d of %d problems (%d replies named no option: the model's answer "
                 "kept); judged accuracy %.2f%%; wrote %s", self.judge.model, len(lines), n, unparsed,
                 100.0 * right / n, output_dir / "scienceqa_judge.jsonl")
        scores = {"judged_accuracy": 100.0 * right / n,
                  "language_only_accuracy": 100.0 * sum(lang_correct.values()) / n}
        if self.breakdown:
            scores.update({f"judged_{k}": v for k, v in scienceqa_breakdown(entries, correct).items()})
        return scores


def judge_message(question: str, model_answer: str, language_answer: str) -> str:
    """The judge's user message: the question (CQM text: context, question, options), the model's answer
    as assistant 1 (it saw the image, if any), the language-only answer as assistant 2, the instruction."""
    return (f"{question}\n\nTwo assistants answered this question. Assistant 1 saw the image of the question, "
            f"if it has one; Assistant 2 read only the text.\n\n[Assistant 1]\n{model_answer}\n[End of Assistant 1]"
            f"\n\n[Assistant 2]\n{language_answer}\n[End of Assistant 2]\n\n{JUDGE_INSTRUCTION}")


def read_language_only(path: Path, pids: Sequence[str]) -> dict[str, str]:
    """{pid: answer text} of a language-only model for every pid of the split: from LLaVA's result json
    ({"outputs": {pid: text}}, what eval_science_qa_gpt4*.py read as --gpt4-result) or an answers jsonl
    ({"question_id", "text"} per line). EvalDataError naming the file for a bad layout or a missing answer."""
    path = Path(path)
    if path.suffix == ".jsonl":
        answers = {str(row["question_id"]): row["text"]
                   for _, row in read_jsonl(path, what="answers", required=("question_id", "text"))}
    else:
        data = read_json(path, dict)
        if not isinstance(data.get("outputs"), dict):
            raise EvalDataError(path, None, 'expected {"outputs": {problem id: answer text}} (LLaVA\'s result json) '
                                            "or a .jsonl answers file")
        answers = {str(k): v for k, v in data["outputs"].items()}
    bad = [p for p in answers if not isinstance(answers[p], str)]
    if bad:
        raise EvalDataError(path, None, f"answer of problem {bad[0]!r}: expected a string")
    missing = [p for p in pids if p not in answers]
    if missing:
        raise EvalDataError(path, None, f"no answer for {len(missing)} of the {len(pids)} test problems (e.g. "
                                        f"{', '.join(missing[:5])}); the judge ensemble needs one for each")
    return answers
