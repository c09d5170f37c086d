"""The benchmarks `python -m fastllava.eval --task` knows, by name."""

from __future__ import annotations

from .base import EvalDataError, EvalQuestion, Task
from .judged import LLaVABench, MMVet
from .mmbench import MMBench, MMBenchCN
from .mme import MME
from .pope import POPE
from .scienceqa import ScienceQA
from .seed import SEED
from .vqa import GQA, TextVQA, VizWiz, VQAv2

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    VQAv2, GQA, VizWiz, TextVQA, POPE, ScienceQA, MME, MMBench, MMBenchCN, SEED, LLaVABench, MMVet)}
JUDGED = (LLaVABench, MMVet)


def make_task(name: str, *, split: str | None = None, judge_url: str | None = None,
              judge_model: str | None = None, **options) -> Task:
    """The task called `name` (on `split`, for a task that has several); the judged ones get a judge when
    a URL is given; `options`: keyword arguments of the task's own (e.g. ScienceQA's question_format,
    language_only), None values left out."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    options = {k: v for k, v in options.items() if v is not None}
    if split is not None:
        if split not in cls.splits:
            known = f"its splits are {', '.join(cls.splits)}" if cls.splits else "it has one split"
            raise ValueError(f"--split {split!r}: task {name} has no such split ({known})")
        return cls(split=split, **options)
    # ScienceQA takes a judge for the paper's ensemble, given a language-only model's answers.
    if cls in JUDGED or options.get("language_only") is not None:
        from ..judge import Judge

        return cls(judge=None if judge_url is None else Judge(judge_url, judge_model), **options)
    if judge_url is not None:
        raise ValueError(f"--judge-url: task {name} is scored locally; only {', '.join(c.name for c in JUDGED)} "
                         "(and scienceqa with --sqa-language-only) use a judge")
    return cls(**options)


__all__ = ["EvalDataError", "EvalQuestion", "JUDGED", "TASKS", "Task", "make_task"]
