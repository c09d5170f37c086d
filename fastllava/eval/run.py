"""`python -m fastllava.eval`: answer a benchmark's questions with a trained model, write LLaVA's answers
file, score it as LLaVA does, and print the scores next to the published LLaVA-1.5 numbers.

Under `torchrun --nproc_per_node=N` every rank holds a whole model and answers questions rank, rank + N,
...; rank 0 gathers the answers back into question order, so the answers file and the scores are those
of one process (greedy decoding is batch-invariant: see fastllava/generate/engine.py).

Without --model it scores what exists: `--answers FILE` (an answers jsonl, LLaVA's or ours, joined to the
questions as answers.py says; no image is read) or, for llava_bench and mmvet, `--reviews FILE...` (the
judge's review or grade files; no question file, image or judge call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..data.files import IMAGE_TAG
from ..extras import cli
from ..data.templates import TEMPLATES, get_template
from ..generate import GenerationStats, Generator
from ..generate.inputs import image_processor, load_model, make_prompt, model_template
from ..progress import progress
from ..train.distributed import destroy_distributed, gather_interleaved, init_distributed
from .answers import join_answers, read_answers
from .hub import is_hub_spec, read_rows, resolve
from .judge import JudgeError
from .tasks import TASKS, make_task
from .tasks.base import EvalDataError, EvalQuestion, LazyImage, Task

REVIEWED = ("llava_bench", "mmvet")  # the tasks whose judge output --reviews scores
HUB_TASKS = tuple(sorted(name for name, cls in TASKS.items() if cls.hub is not None))  # --data hub

# Prompts prepared per generator slot and group (answer): a group of 4 * 64 prompts holds 347 MB of pixels at
# 336 px, and its end drains the slots once (the last answers of a group finish with fewer sequences running).
GROUP_PER_SLOT = 4

log = logging.getLogger("fastllava.eval")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastllava.eval",
        description="Evaluate a LLaVA model on one of LLaVA-1.5's benchmarks, read from LLaVA's "
                    "playground/data/eval layout and scored as LLaVA scores it; or, without a model, score an "
                    "existing answers file (--answers) or the judge's review/grade files (--reviews).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="llava-hf model directory with its tokenizer: answer the questions")
    source.add_argument("--answers", metavar="FILE", help="score this answers jsonl instead (LLaVA's model_vqa*.py "
                                                          "format or ours); no model, no image files")
    source.add_argument("--reviews", metavar="FILE", nargs="+",
                        help="llava_bench: review files of eval_gpt_review_bench.py (each scored, the mean "
                             "reported); mmvet: grade files of MM-Vet's evaluator (the mean of their runs)")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK",
                        help=f"one of: {', '.join(sorted(TASKS))}")
    parser.add_argument("--data", default=None, help="the folder LLaVA calls playground/data/eval (not needed "
                                                     "with --reviews; mmvet reads mm-vet.json there if given); for "
                                                     f"{', '.join(HUB_TASKS)}: 'hub' (lmms-eval's Hub dataset), a Hub "
                                                     "dataset id org/name[@revision], or a folder of its parquet files")
    parser.add_argument("--output", required=True, help="folder for answers.jsonl, scores and submission files")
    parser.add_argument("--missing-as-wrong", action="store_true",
                        help="--answers: score questions without an answer as wrong (default: an error)")
    parser.add_argument("--split", default=None, help="for vqav2 and vizwiz: a split with answers, scored locally "
                                                       "(default: LLaVA's test split, written for upload)")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES), help="conversation template of the prompts (default: the one "
                        "the model was trained in, as its fastllava.json records; else vicuna_v1, LLaVA-1.5's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: LLaVA's value for the task")
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together (KV-cache slots)")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="token budget of one packed prefill")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N questions (a smoke run)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint scoring llava_bench / mmvet "
                                                          "(key from $FASTLLAVA_JUDGE_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--judge-model", default=None, help="the judge's model name at --judge-url")
    parser.add_argument("--sqa-format", default=None, metavar="FMT",
                        help="scienceqa: question file llava_test_FMT.json; CQM-A (default) is LLaVA-1.5's protocol "
                             "(with the single-letter instruction), others (e.g. QCM-LEA, the LLaVA paper's fine-tuned "
                             "model) are asked as written (docs/evaluation.md)")
    parser.add_argument("--sqa-language-only", default=None, metavar="FILE",
                        help="scienceqa: a language-only model's answers ({'outputs': {pid: text}} json or answers "
                             "jsonl); with --judge-url/--judge-model, adds the LLaVA paper's 'GPT-4 as the judge' scores")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "max_batch_size", "prefill_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (args.judge_url is None) != (args.judge_model is None):
        parser.error("--judge-url and --judge-model go together")
    if (args.sqa_format is not None or args.sqa_language_only is not None) and args.task != "scienceqa":
        parser.error("--sqa-format and --sqa-language-only are options of --task scienceqa")
    if args.task == "scienceqa" and (args.sqa_language_only is None) != (args.judge_url is None):
        parser.error("--task scienceqa: --sqa-language-only and --judge-url/--judge-model go together (the judge "
                     "decides where the model and the language-only answers disagree)")
    if args.sqa_language_only is not None and not Path(args.sqa_language_only).is_file():
        parser.error(f"--sqa-language-only {args.sqa_language_only}: file not found")
    if args.sqa_format is not None:
        from ..data.scienceqa import check_format

        try:
            check_format(args.sqa_format)
        except ValueError as e:
            parser.error(f"--sqa-format: {e}")
    try:
        if args.model is not None:
            args.template = model_template(args.model, args.template)
        if args.template is not None:
            get_template(args.template)
    except ValueError as e:
        parser.error(f"--template: {e}")
    if args.reviews is not None:
        if args.task not in REVIEWED:
            parser.error(f"--reviews: only {' and '.join(REVIEWED)} are scored from judge output; --task "
                         f"{args.task} is scored from --answers")
        if args.judge_url is not None:
            parser.error("--reviews scores existing judge output; --judge-url judges again (give it --answers)")
        for path in args.reviews:
            if not Path(path).is_file():
                parser.error(f"--reviews {path}: file not found")
    elif args.data is None:
        parser.error("--data is required (except with --reviews)")
    if args.answers is not None and not Path(args.answers).is_file():
        parser.error(f"--answers {args.answers}: file not found")
    if args.missing_as_wrong and args.answers is None:
        parser.error("--missing-as-wrong goes with --answers")
    if args.data is not None and not Path(args.data).is_dir():
        if not is_hub_spec(args.data):
            parser.error(f"--data {args.data}: not a directory, nor 'hub' or a Hub dataset id org/name")
        if args.task not in HUB_TASKS:
            parser.error(f"--data {args.data}: task {args.task} reads only LLaVA's layout (a directory); the Hub "
                         f"datasets are read for {', '.join(HUB_TASKS)}")
    return args


def task_for(args: argparse.Namespace) -> Task:
    """The task the command line names, with its options (scienceqa: always with the per-class table)."""
    sqa = {"question_format": args.sqa_format, "language_only": args.sqa_language_only,
           "breakdown": True} if args.task == "scienceqa" else {}
    return make_task(args.task, split=args.split, judge_url=args.judge_url, judge_model=args.judge_model, **sqa)


def load_questions(task: Task, data: str, *, images: bool = True) -> list[EvalQuestion]:
    """The task's questions from --data: LLaVA's layout, or (hub.py) the rows of its Hub dataset."""
    if task.hub is not None and is_hub_spec(data):
        return task.load_hub(read_rows(resolve(data, task.hub), task.hub), images=images)
    return task.load(Path(data), images=images)


def answer_id(model_id: str, question_id) -> str:
    """A stable id in place of LLaVA's random shortuuid, so that 1 and N processes write the same file."""
    return hashlib.sha1(f"{model_id}\0{question_id}".encode()).hexdigest()[:22]


def check_unique(questions: Sequence[EvalQuestion], task: Task, data: Path) -> None:
    """A duplicate question id would make two answers indistinguishable in LLaVA's converters."""
    seen = {}
    for i, q in enumerate(questions):
        if q.question_id in seen:
            raise EvalDataError(data / task.name, None, f"question id {q.question_id!r} appears twice "
                                                        f"(questions {seen[q.question_id] + 1} and {i + 1})")
        seen[q.question_id] = i


def answer(questions: Sequence[EvalQuestion], model, tokenizer, args, max_new_tokens: int, *,
           show_progress: bool) -> tuple[list[str], dict]:
    """Greedy answers (text) to `questions` in order, and the generator's statistics (summed over groups).

    The prompts go to the generator in groups of GROUP_PER_SLOT * --max-batch-size (prepared), so that only
    about two groups' pixels exist at a time: all of VQAv2 test-dev's would be 145 GB (1.35 MB per question at
    336 px). A group's end drains the generator's slots once; greedy answers do not depend on their batch."""
    processor = image_processor(model.config, args.model)

    def prompt(q: EvalQuestion) -> dict:
        turns = [{"from": "human", "value": (IMAGE_TAG + "\n") * len(q.images) + q.text}]
        images = [im.open() if isinstance(im, LazyImage) else im for im in q.images]
        return make_prompt(turns, images, tokenizer, model, args.template, processor)

    generator = Generator(model, max_batch_size=args.max_batch_size, prefill_tokens=args.prefill_tokens)
    stop = get_template(args.template).stop_ids(tokenizer)  # where an answer ends: EOS or the template's marker
    ids: list[list[int]] = [[] for _ in questions]
    stats = vars(GenerationStats())
    with progress(len(questions), desc=args.task, unit="q", enabled=show_progress) as bar:
        for start, prompts in prepared(questions, prompt, GROUP_PER_SLOT * args.max_batch_size):
            for event in generator.stream(prompts, max_new_tokens=max_new_tokens, stop=stop):
                ids[start + event.index] += event.tokens
                if event.done:
                    bar.update(1)
            stats = {k: v + getattr(generator.stats, k) for k, v in stats.items()}
            del prompts  # this group's pixels go before the next group is handed out
    # LLaVA's scripts decode with skip_special_tokens and strip.
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids], stats


def prepared(items: Sequence, build: Callable, size: int) -> Iterator[tuple[int, list]]:
    """(start, [build(x) for x in items[start:start + size]]) for start = 0, size, 2 * size, ..., in order;
    the next group is built in a background thread while the caller uses this one (a caller that drops each
    group before asking for the next holds at most two). An exception of `build` is raised here, in order."""
    # One thread: a fast tokenizer used from several threads at once can fail ("Already borrowed"); one already
    # takes the preparing off the generator's time.
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.map(build, items[:size])
        for start in range(0, len(items), size):
            group = list(ahead)
            ahead = pool.map(build, items[start + size:start + 2 * size])
            yield start, group
            del group


def write_answers(path: Path, questions: Sequence[EvalQuestion], texts: Sequence[str], model_id: str) -> None:
    """LLaVA's answers jsonl: question_id, prompt, text, answer_id, model_id, metadata (+ the task's fields)."""
    with open(path, "w") as f:
        for q, text in zip(questions, texts):
            line = {"question_id": q.question_id, "prompt": q.text, "text": text,
                    "answer_id": answer_id(model_id, q.question_id), "model_id": model_id, "metadata": {}}
            line.update(q.record)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_scores(task: Task, scores: dict[str, float], model_id: str, output: Path, **extra) -> str:
    """scores.json ({"task", "model", "scores", **extra}) and scores.md (score_table) in output; returns the
    table (or the line saying there is no local score)."""
    output.mkdir(parents=True, exist_ok=True)
    table = score_table(task, scores, model_id) if scores else f"{task.name}: no local score (see the submission file in {output})"
    (output / "scores.json").write_text(json.dumps({"task": task.name, "model": model_id, "scores": scores, **extra},
                                                   indent=2) + "\n")
    (output / "scores.md").write_text(table + "\n")
    return table


def score_table(task: Task, scores: dict[str, float], model_id: str) -> str:
    """Markdown: each metric, ours next to LLaVA-1.5-7B/13B's published value where there is one."""
    published = task.published
    columns = sorted(published)
    lines = [f"| {task.name} | {model_id} | " + " | ".join(columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for metric, value in scores.items():
        refs = [published[c].get(metric) for c in columns]
        lines.append(f"| {metric} | {value:.2f} | " + " | ".join("" if r is None else f"{r:.2f}" for r in refs) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; returns the scores (rank 0) or {} (other ranks)."""
    if args.model is None:
        return score_existing(args)
    env = init_distributed(args.device)
    rank, world = env.rank, env.world_size
    task = task_for(args)
    data, output = Path(args.data), Path(args.output)
    questions = load_questions(task, args.data)
    check_unique(questions, task, data)
    questions = questions[: args.limit] if args.limit else questions
    if not questions:
        raise EvalDataError(data, None, f"task {task.name} found no questions")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=env.device)
    model_id = Path(args.model).resolve().name
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    start = time.perf_counter()
    texts, stats = answer(questions[rank::world], model, tokenizer, args, max_new_tokens, show_progress=rank == 0)
    texts = gather_interleaved(texts, rank, world)
    all_stats = gather_interleaved([stats], rank, world)
    wall = time.perf_counter() - start
    if rank != 0:
        return {}
    output.mkdir(parents=True, exist_ok=True)
    write_answers(output / "answers.jsonl", questions, texts, model_id)
    scores = task.score(questions, texts, output)
    summary = speed_summary(len(questions), wall, all_stats)
    print(write_scores(task, scores, model_id, output, speed=summary))
    print(format_speed(summary))
    print(f"answers: {output / 'answers.jsonl'}")
    return scores


def score_existing(args: argparse.Namespace) -> dict:
    """--answers: the task's questions (no images) joined to the file's answers and scored; --reviews: the
    judge's files scored, and the mean over files reported. One process; nothing is generated."""
    task, output = task_for(args), Path(args.output)
    if args.reviews is not None:
        per_file = task.score_reviews([Path(p) for p in args.reviews], None if args.data is None else Path(args.data))
        # The mean over files of each metric every file has (the published LLaVA-Bench number is a mean of three).
        metrics = [m for m in per_file[0] if all(m in f for f in per_file)]
        scores = {m: sum(f[m] for f in per_file) / len(per_file) for m in metrics}
        model_id = Path(args.reviews[0]).stem
        print(write_scores(task, scores, model_id, output,
                           reviews=[{"file": str(p), "scores": f} for p, f in zip(args.reviews, per_file)]))
        if len(per_file) > 1:
            for path, f in zip(args.reviews, per_file):
                print(f"{path}: " + ", ".join(f"{m} {f[m]:.2f}" for m in metrics[:4]))
        return scores
    data, answers_path = Path(args.data), Path(args.answers)
    questions = load_questions(task, args.data, images=False)
    check_unique(questions, task, data)
    questions = questions[: args.limit] if args.limit else questions
    if not questions:
        raise EvalDataError(data, None, f"task {task.name} found no questions")
    rows = read_answers(answers_path)
    texts = join_answers(questions, rows, answers_path, missing_as_wrong=args.missing_as_wrong,
                         unanswered=task.unanswered)
    model_id = str(rows[0][1].get("model_id") or answers_path.stem) if rows else answers_path.stem
    scores = task.score(questions, texts, output)
    print(write_scores(task, scores, model_id, output, answers=str(answers_path)))
    return scores


def speed_summary(num_questions: int, wall: float, stats: list[dict]) -> dict:
    """Wall clock and questions/s of the run; prefill and decode tokens per second of one process's
    generator time (tokens and seconds summed over processes)."""
    total = {k: sum(s[k] for s in stats) for k in ("prefill_tokens", "prefill_seconds", "decode_tokens", "decode_seconds")}
    return {"questions": num_questions, "wall_seconds": round(wall, 3), "questions_per_s": num_questions / wall,
            "prefill_tokens_per_s": total["prefill_tokens"] / max(total["prefill_seconds"], 1e-9),
            "decode_tokens_per_s": total["decode_tokens"] / max(total["decode_seconds"], 1e-9), **total}


def format_speed(s: dict) -> str:
    """One line: wall clock, questions/s, and per-process prefill and decode tokens/s."""
    return (f"{s['questions']} questions in {s['wall_seconds']:.1f} s: {s['questions_per_s']:.2f} questions/s; "
            f"per process: prefill {s['prefill_tokens_per_s']:,.0f} tokens/s, "
            f"decode {s['decode_tokens_per_s']:,.0f} tokens/s")


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except (EvalDataError, ValueError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    return 0
