"""The two benchmarks LLaVA-1.5 scores with a GPT-4 judge: LLaVA-Bench-in-the-Wild and MM-Vet.

Both are answered by llava/eval/model_vqa.py (max_new_tokens 1024, the question text as is). The judge
runs only when the task is given one (`--judge-url`/`--judge-model`); without it, score() leaves what the
official graders read and returns {}. Judge output that exists already is scored by `score_reviews`, from
the review or grade files alone (`python -m fastllava.eval --reviews FILE...`; no question file, image or
judge call):

* LLaVA-Bench (scripts/v1_5/eval/llavabench.sh): eval_gpt_review_bench.py reads the answers file itself,
  next to the reference answers. With a judge: GPT-4's review of each answer against the reference
  (`reviews/llava_bench.jsonl`), summarized as summarize_gpt_review.py does.
* MM-Vet (scripts/v1_5/eval/mmvet.sh): `results/mmvet.json` as scripts/convert_mmvet_for_eval.py writes
  it ({"v1_<question_id>": answer}), the input of MM-Vet's official mm-vet_evaluator. With a judge: one
  grading run of that evaluator (`results/mmvet_<judge model>-grade-1runs.json`, `...-cap-score-1runs.csv`).

Layout (docs/Evaluation.md): `llava-bench-in-the-wild/` = the Hugging Face dataset
liuhaotian/llava-bench-in-the-wild: questions.jsonl, images/, context.jsonl (each image's caption: the
judge's context) and answers_gpt4.jsonl -- the reference answers (text-only GPT-4 given the question and
the caption), the judge's "Assistant 1". `mm-vet/` (mmvet.sh's folder; `mmvet/` of docs/Evaluation.md is
tried second): LLaVA's llava-mm-vet.jsonl, and from mm-vet.zip images/ and mm-vet.json (ground truth and
capabilities, needed only to judge).

From the Hub (`--data hub`, fastllava/eval/hub.py): the datasets lmms-eval's llava-in-the-wild.yaml and
mmvet.yaml name, whose rows carry what the layout's side files hold (the caption and GPT-4 reference of
LLaVA-Bench; MM-Vet's ground truth and capabilities), so load_hub gives the same questions and the judge the
same requests.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..scorers import llava_bench_summary, mmvet_totals
from .base import EvalDataError, EvalQuestion, HubSource, Task
from .reading import image_cell, image_file, read_json, read_jsonl

if TYPE_CHECKING:
    from ..judge import Judge

log = logging.getLogger(__name__)


CATEGORIES = ("conv", "detail", "complex")  # LLaVA-Bench's, each with its rule in LLaVA's rule.json


def _unique(key, seen: dict, path: Path, line: int) -> None:
    if key in seen:
        raise EvalDataError(path, line, f"question_id {key!r} repeats line {seen[key]}")
    seen[key] = line


def _unique_row(key, seen: dict, file: Path, row: int) -> None:
    """_unique for the rows of Hub parquet files (0-based rows of one file; a split may have several)."""
    if key in seen:
        raise EvalDataError(file, None, f"row {row}: question_id {key!r} repeats {seen[key]}")
    seen[key] = f"{Path(file).name} row {row}"


def _caption(caption) -> str:
    """The judge's context: a caption, or a list of sentences one a line (eval_gpt_review_bench.py and
    lmms-eval's utils.py both join a list so)."""
    return "\n".join(caption) if isinstance(caption, list) else caption


class LLaVABench(Task):
    """LLaVA-Bench-in-the-Wild: 60 open questions on 24 images (conv, detail, complex)."""

    name = "llava_bench"
    max_new_tokens = 1024  # model_vqa.py passes max_new_tokens=1024 to generate
    # docs/MODEL_ZOO.md "LLaVA-Bench-Wild": the relative score (answer / GPT-4 reference, %), overall.
    published = {"llava-v1.5-7b": {"overall": 65.4}, "llava-v1.5-13b": {"overall": 72.5}}
    # lmms-eval's llava-in-the-wild.yaml: its one split is "train" (60 rows, one shard).
    hub = HubSource("lmms-lab/llava-bench-in-the-wild", "data/train-*.parquet",
                    ("question_id", "question", "image", "caption", "gpt_answer", "category"))

    def __init__(self, judge: Judge | None = None):
        self.judge = judge

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "llava-bench-in-the-wild"
        path = root / "questions.jsonl"
        captions, references = {}, {}
        if self.judge is not None:  # what the judge needs is checked now, before any answer is generated
            for _, obj in read_jsonl(root / "context.jsonl", required=("image", "caption")):
                captions[obj["image"]] = _caption(obj["caption"])
            ref_path, seen = root / "answers_gpt4.jsonl", {}
            for line, obj in read_jsonl(ref_path, required=("question_id", "text")):
                _unique(obj["question_id"], seen, ref_path, line)
                # eval_gpt_review_bench.py pairs question and reference by line; by question_id here (the
                # same pairs in the released files, and no silent shift if a line is missing).
                references[obj["question_id"]] = (obj["text"], obj.get("answer_id", obj["question_id"]))
        questions, seen = [], {}
        for line, obj in read_jsonl(path, required=("question_id", "image", "text", "category")):
            qid = obj["question_id"]
            _unique(qid, seen, path, line)
            image = image_file(root / "images", obj["image"], path, line, check=images)
            truth = {"category": obj["category"], "question": obj["text"]}
            if self.judge is not None:
                if obj["category"] not in CATEGORIES:
                    raise EvalDataError(path, line, f"category: expected conv, detail or complex, got {obj['category']!r}")
                if obj["image"] not in captions:
                    raise EvalDataError(root / "context.jsonl", None,
                                        f"no caption for image {obj['image']!r} ({path.name}:{line})")
                if qid not in references:
                    raise EvalDataError(root / "answers_gpt4.jsonl", None,
                                        f"no reference answer for question_id {qid!r} ({path.name}:{line})")
                reference, reference_id = references[qid]
                truth.update(caption=captions[obj["image"]], reference=reference, reference_id=reference_id)
            questions.append(EvalQuestion(question_id=qid, text=obj["text"], images=[image], truth=truth))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """LLaVA's questions from lmms-lab/llava-bench-in-the-wild rows, by question_id (questions.jsonl's
        order): the question as is (lmms-eval's prompts for it are empty too), with a judge the row's caption
        as the context and gpt_answer as the reference. The rows do not carry the reference's answer_id
        (answers_gpt4.jsonl's), so the reviews' "answer1_id" is the question_id, as load() does for a
        reference line without one."""
        questions, seen = [], {}
        for file, i, row in rows:
            try:
                qid = int(row["question_id"])
            except (TypeError, ValueError):
                raise EvalDataError(file, None, f"row {i}: expected an integer question_id, got "
                                                f"{row['question_id']!r}") from None
            _unique_row(qid, seen, file, i)
            truth = {"category": row["category"], "question": row["question"]}
            if self.judge is not None:
                if row["category"] not in CATEGORIES:
                    raise EvalDataError(file, None, f"row {i}: category: expected conv, detail or complex, got "
                                                    f"{row['category']!r}")
                truth.update(caption=_caption(row["caption"]), reference=row["gpt_answer"], reference_id=qid)
            image = [image_cell(row["image"], file, i)] if images else []
            questions.append(EvalQuestion(question_id=qid, text=row["question"], images=image, truth=truth))
        return sorted(questions, key=lambda q: q.question_id)

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """With a judge: relative scores "overall", "conv", "detail", "complex" and the two averages x 10;
        without: {} (eval_gpt_review_bench.py takes the answers file as it is)."""
        if len(questions) != len(answers):
            raise ValueError(f"{self.name}: {len(questions)} questions but {len(answers)} answers")
        if self.judge is None:
            log.info("llava_bench: no judge; LLaVA's eval_gpt_review_bench.py scores the answers file "
                     "(--answer-list answers_gpt4.jsonl <answers file>)")
            return {}
        items = [{"question_id": q.question_id, "category": q.truth["category"], "caption": q.truth["caption"],
                  "question": q.truth["question"], "reference": q.truth["reference"],
                  "reference_id": q.truth["reference_id"], "answer": a, "answer_id": None}
                 for q, a in zip(questions, answers)]
        from ..judge import judge_llava_bench

        reviews = judge_llava_bench(self.judge, items)
        out = Path(output_dir) / "reviews" / "llava_bench.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8")
        log.info("llava_bench: %d reviews by %s in %s", len(reviews), self.judge.model, out)
        return llava_bench_summary(reviews)


    def score_reviews(self, paths: Sequence[Path], data_dir: Path | None = None) -> list[dict[str, float]]:
        """summarize_gpt_review.py's numbers of each review file ({"question_id", "category", "tuple":
        [reference score, answer score], ...} per line, as eval_gpt_review_bench.py writes it), in order. The
        published LLaVA-Bench numbers are the mean over three such files. `data_dir` is not needed."""
        out = []
        for path in paths:
            reviews = []
            for line, obj in read_jsonl(Path(path), what="a LLaVA-Bench review file (eval_gpt_review_bench.py)",
                                        required=("question_id", "category", "tuple")):
                pair = obj["tuple"]
                if not (isinstance(pair, list) and len(pair) == 2
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
                    raise EvalDataError(path, line, f'expected "tuple": [reference score, answer score], got {pair!r}')
                reviews.append(obj)
            if not reviews:
                raise EvalDataError(path, None, "no reviews in the file")
            out.append(llava_bench_summary(reviews))
            log.info("llava_bench: %s: %d reviews, overall %s", path, len(reviews), out[-1].get("overall"))
        return out


class MMVet(Task):
    """MM-Vet: 218 open questions graded 0-1 by GPT-4 against ground truth, reported per capability."""

    name = "mmvet"
    max_new_tokens = 1024  # model_vqa.py passes max_new_tokens=1024 to generate
    # docs/MODEL_ZOO.md "MM-Vet": the official evaluator's total score.
    published = {"llava-v1.5-7b": {"total": 31.1}, "llava-v1.5-13b": {"total": 36.1}}
    folders = ("mm-vet", "mmvet")
    # lmms-eval's mmvet.yaml (split test): question_id is MM-Vet's sample id "v1_<n>", capability a
    # comma-separated string ("ocr,math"; its utils.py splits it on ",").
    hub = HubSource("lmms-lab/MMVet", "data/test-*.parquet",
                    ("question_id", "image", "question", "answer", "capability"))

    def __init__(self, judge: Judge | None = None):
        self.judge = judge

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        roots = [Path(data_dir) / folder for folder in self.folders]
        root = next((r for r in roots if (r / "llava-mm-vet.jsonl").is_file()), roots[0])
        path = root / "llava-mm-vet.jsonl"
        self._meta = self._metadata(root / "mm-vet.json") if self.judge is not None else None
        questions, seen = [], {}
        for line, obj in read_jsonl(path, required=("question_id", "image", "text")):
            qid = obj["question_id"]
            _unique(qid, seen, path, line)
            key = f"v1_{qid}"  # convert_mmvet_for_eval.py's key: mm-vet.json's sample ids
            if self._meta is not None and key not in self._meta:
                raise EvalDataError(path, line, f"question_id {qid!r}: no sample {key!r} in mm-vet.json")
            image = image_file(root / "images", obj["image"], path, line, check=images)
            questions.append(EvalQuestion(question_id=qid, text=obj["text"], images=[image], truth={"key": key}))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """LLaVA's questions from lmms-lab/MMVet rows, in row order: id n of the row's "v1_<n>", the question as
        is (LLaVA's llava-mm-vet.jsonl text; lmms-eval's "think step by step" pre_prompt is its own, not
        LLaVA's); with a judge, the rows' ground truth and capabilities stand for mm-vet.json."""
        meta, questions = self._hub_samples(rows, images=images)
        self._meta = meta if self.judge is not None else None
        return questions

    @staticmethod
    def _hub_samples(rows, *, images: bool) -> tuple[dict[str, dict], list[EvalQuestion]]:
        """({"v1_<n>": {"question", "answer", "capability": [...]}} as mm-vet.json holds it, the questions)."""
        meta, questions, seen = {}, [], {}
        for file, i, row in rows:
            n = str(row["question_id"]).removeprefix("v1_")
            caps = row["capability"]
            if not n.isdigit() or not isinstance(caps, str):
                raise EvalDataError(file, None, f"row {i}: expected question_id 'v1_<n>' (MM-Vet's sample id) and "
                                                f"capability a comma-separated string, got {row['question_id']!r}, "
                                                f"{caps!r}")
            key = f"v1_{int(n)}"
            _unique_row(key, seen, file, i)
            meta[key] = {"question": row["question"], "answer": row["answer"],
                         "capability": [c.strip() for c in caps.split(",")]}
            image = [image_cell(row["image"], file, i)] if images else []
            questions.append(EvalQuestion(question_id=int(n), text=row["question"], images=image, truth={"key": key}))
        return meta, questions

    def score_reviews(self, paths: Sequence[Path], data_dir: Path | None = None) -> list[dict[str, float]]:
        """Each grade file's scores, in order: the mean over its runs of what the official evaluator computes
        per run (grade file: {"v1_<n>": {"score": [one per run], ...}}, as mm-vet_evaluator.py writes it).
        Without mm-vet.json (under data_dir) or the Hub rows (data_dir `hub`, an id or a parquet folder, as
        `--data` takes them) only "total" is known, over the graded samples; with them, each capability too,
        over all samples (an ungraded one counts 0, as the evaluator's counts do)."""
        capabilities = None
        if data_dir is not None:
            from ..hub import is_hub_spec, read_rows, resolve  # here: hub.py imports this package

            found = [Path(data_dir) / f / "mm-vet.json" for f in self.folders if (Path(data_dir) / f / "mm-vet.json").is_file()]
            if found:
                capabilities = {k: s["capability"] for k, s in self._metadata(found[0]).items()}
            elif is_hub_spec(str(data_dir)):
                meta, _ = self._hub_samples(read_rows(resolve(str(data_dir), self.hub), self.hub), images=False)
                capabilities = {k: s["capability"] for k, s in meta.items()}
        out = []
        for path in paths:
            grades = read_json(Path(path), dict)
            runs = set()
            for key, grade in grades.items():
                scores = grade.get("score") if isinstance(grade, dict) else None
                if not (isinstance(scores, list) and scores
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)):
                    raise EvalDataError(path, None, f'sample {key!r}: expected {{"score": [a number per run], ...}}')
                runs.add(len(scores))
            if len(runs) != 1:
                raise EvalDataError(path, None, f"samples graded a different number of times ({sorted(runs)}): an "
                                                "unfinished run of the evaluator")
            n_runs = runs.pop() if runs else 0
            if not n_runs:
                raise EvalDataError(path, None, "no grades in the file")
            caps = capabilities or {key: [] for key in grades}
            per_run = [mmvet_totals({k: g["score"][i] for k, g in grades.items()}, caps) for i in range(n_runs)]
            out.append({m: sum(r[m] for r in per_run) / n_runs for m in per_run[0]})
            log.info("mmvet: %s: %d samples, %d run(s), total per run %s", path, len(grades), n_runs,
                     ", ".join(f"{r['total']:.1f}" for r in per_run))
        return out

    @staticmethod
    def _metadata(path: Path) -> dict[str, dict]:
        """mm-vet.json: {"v1_<n>": {"question", "answer", "capability": [...], ...}}."""
        if not path.is_file():
            raise EvalDataError(path, None, "file not found (mm-vet.zip's ground truth, needed to judge)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            for key, sample in data.items():
                fields = (("question", str), ("answer", str), ("capability", list))
                if not all(isinstance(sample.get(k), t) for k, t in fields):
                    raise ValueError(f"sample {key!r}")
        except (json.JSONDecodeError, AttributeError, ValueError) as e:
            raise EvalDataError(path, None, "expected {\"v1_<n>\": {\"question\": str, \"answer\": str, "
                                            f"\"capability\": [str]}} ({e})") from None
        return data

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        """Writes results/mmvet.json; with a judge, grades it and returns "total" and each capability's score
        (percent; MM-Vet's tables round them to 1 decimal); without, returns {}."""
        if len(questions) != len(answers):
            raise ValueError(f"{self.name}: {len(questions)} questions but {len(answers)} answers")
        results = {q.truth["key"]: a for q, a in zip(questions, answers)}
        out = Path(output_dir) / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "mmvet.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        if self.judge is None:
            log.info("mmvet: no judge; grade %s with MM-Vet's official mm-vet_evaluator", out / "mmvet.json")
            return {}
        meta = getattr(self, "_meta", None)
        if meta is None:
            raise ValueError("mmvet: score() with a judge needs load() first (it reads mm-vet.json)")
        from ..judge import judge_mmvet

        items = [{"key": key, "question": s["question"], "answer": s["answer"], "prediction": results[key]}
                 for key, s in meta.items() if key in results]  # the evaluator's order: mm-vet.json's
        grades = judge_mmvet(self.judge, items)
        stem = f"mmvet_{self.judge.model.replace('/', '_')}"
        (out / f"{stem}-grade-1runs.json").write_text(json.dumps(grades, indent=4), encoding="utf-8")
        totals = mmvet_totals({k: g["score"][0] for k, g in grades.items()},
                              {k: s["capability"] for k, s in meta.items()})
        # The evaluator's cap-score table: capabilities by frequency, total, std and runs of one run.
        caps = [c for c, _ in Counter(c for s in meta.values() for c in set(s["capability"])).most_common()]
        header = ["", *caps, "total", "std", "runs"]
        row = ["mmvet", *(f"{totals[c]:.1f}" for c in caps), f"{totals['total']:.1f}", "0.0", f"[{totals['total']:.1f}]"]
        (out / f"{stem}-cap-score-1runs.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n", encoding="utf-8")
        log.info("mmvet: %d grades by %s in %s", len(grades), self.judge.model, out)
        return totals
