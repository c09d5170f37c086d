"""`python -m fastllava.eval`: answer a benchmark's questions with a trained model, write LLaVA's answers
file, score it as LLaVA does, and print the scores next to the published LLaVA-1.5 numbers.

Under `torchrun --nproc_per_node=N` every rank holds a whole model and answers questions rank, rank + N,
...; rank 0 gathers the answers back into question order, so the answers file and the scores are those
of one process (greedy decoding is batch-invariant: see fastllava/generate/engine.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..data.files import IMAGE_TAG
from ..generate import Generator
from ..generate.inputs import load_model, make_prompt
from ..progress import progress
from ..train.distributed import gather_interleaved
from .judge import JudgeError
from .tasks import TASKS, make_task
from .tasks.base import EvalDataError, EvalQuestion, Task

log = logging.getLogger("fastllava.eval")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastllava.eval",
        description="Evaluate a LLaVA model on one of LLaVA-1.5's benchmarks, read from LLaVA's "
                    "playground/data/eval layout and scored as LLaVA scores it.")
    parser.add_argument("--model", required=True, help="llava-hf model directory with its tokenizer")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK",
                        help=f"one of: {', '.join(sorted(TASKS))}")
    parser.add_argument("--data", required=True, help="the folder LLaVA calls playground/data/eval")
    parser.add_argument("--output", required=True, help="folder for answers.jsonl, scores and submission files")
    parser.add_argument("--split", default=None, help="for vqav2 and vizwiz: a split with answers, scored locally "
                                                       "(default: LLaVA's test split, written for upload)")
    parser.add_argument("--template", default="vicuna_v1", help="conversation template of the prompts (LLaVA-1.5: vicuna_v1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: LLaVA's value for the task")
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together (KV-cache slots)")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="token budget of one packed prefill")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N questions (a smoke run)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
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
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: not a directory")
    return args


def task_for(args: argparse.Namespace) -> Task:
    """The task the command line names, with its options (scienceqa: always with the per-class table)."""
    sqa = {"question_format": args.sqa_format, "language_only": args.sqa_language_only,
           "breakdown": True} if args.task == "scienceqa" else {}
    return make_task(args.task, split=args.split, judge_url=args.judge_url, judge_model=args.judge_model, **sqa)


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
    """Greedy answers (text) to `questions` in order, and the generator's statistics."""
    prompts = []
    for q in questions:
        turns = [{"from": "human", "value": (IMAGE_TAG + "\n") * len(q.images) + q.text}]
        prompts.append(make_prompt(turns, q.images, tokenizer, model, args.template))
    generator = Generator(model, max_batch_size=args.max_batch_size, prefill_tokens=args.prefill_tokens)
    ids: list[list[int]] = [[] for _ in questions]
    with progress(len(questions), desc=args.task, unit="q", enabled=show_progress) as bar:
        for event in generator.stream(prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id):
            ids[event.index] += event.tokens
            if event.done:
                bar.update(1)
    # LLaVA's scripts decode with skip_special_tokens and strip.
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids], vars(generator.stats)


def write_answers(path: Path, questions: Sequence[EvalQuestion], texts: Sequence[str], model_id: str) -> None:
    """LLaVA's answers jsonl: question_id, prompt, text, answer_id, model_id, metadata (+ the task's fields)."""
    with open(path, "w") as f:
        for q, text in zip(questions, texts):
            line = {"question_id": q.question_id, "prompt": q.text, "text": text,
                    "answer_id": answer_id(model_id, q.question_id), "model_id": model_id, "metadata": {}}
            line.update(q.record)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


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
    import os

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    task = task_for(args)
    data, output = Path(args.data), Path(args.output)
    questions = task.load(data)
    check_unique(questions, task, data)
    questions = questions[: args.limit] if args.limit else questions
    if not questions:
        raise EvalDataError(data, None, f"task {task.name} found no questions")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
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
    table = score_table(task, scores, model_id) if scores else f"{task.name}: no local score (see the submission file in {output})"
    (output / "scores.json").write_text(json.dumps({"task": task.name, "model": model_id, "scores": scores,
                                                    "speed": summary}, indent=2) + "\n")
    (output / "scores.md").write_text(table + "\n")
    print(table)
    print(format_speed(summary))
    print(f"answers: {output / 'answers.jsonl'}")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except (EvalDataError, ValueError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
