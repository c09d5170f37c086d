"""Answers files that already exist, scored without a model: LLaVA's answers jsonl (one {"question_id",
"text", ...} per line, what its llava/eval/model_vqa*.py scripts write and what `python -m fastllava.eval`
writes) read and joined to a task's questions.

The join is LLaVA's converters': by question_id. Where a task's question file repeats an id (TextVQA's is
the image id, MME's names both questions of an image, MMBench's rounds share a row's index), the k-th
question with that id takes the k-th answer line with it, the file order LLaVA's scripts write.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from pathlib import Path
from typing import Callable, Sequence

from .tasks.base import EvalDataError, EvalQuestion
from .tasks.reading import read_jsonl

log = logging.getLogger(__name__)


def llava_id(question: EvalQuestion):
    """The id LLaVA's files give the question: record["question_id"] where the task made it unique."""
    return question.record.get("question_id", question.question_id)


def _key(question_id) -> str:
    # A question file and an answers file written from it agree on the id's JSON type; str() also forgives
    # a tool that wrote 12 for "12".
    return str(question_id)


def read_answers(path: Path) -> list[tuple[int, dict]]:
    """(line, {"question_id", "text", ...}) per line of an answers jsonl; EvalDataError naming the file and line
    for a line without them or with a text that is not a string."""
    rows = list(read_jsonl(Path(path), what="an answers file: one {\"question_id\", \"text\", ...} per line, as "
                                           "LLaVA's model_vqa*.py write it", required=("question_id", "text")))
    for line, row in rows:
        if not isinstance(row["text"], str):
            raise EvalDataError(path, line, f'expected "text" to be a string, got {type(row["text"]).__name__}')
    return rows


def join_answers(questions: Sequence[EvalQuestion], rows: Sequence[tuple[int, dict]], path: Path, *,
                 missing_as_wrong: bool = False, unanswered: Callable[[EvalQuestion], str] = lambda q: "") -> list[str]:
    """answers[i] for questions[i], joined as the module docstring says.

    A question without an answer line is an EvalDataError naming the count and the first ids, unless
    `missing_as_wrong`: then it is answered `unanswered(question)` (Task.unanswered: an answer its scorer
    counts wrong) and counted in the log. Answer lines no question takes are counted in the log."""
    by_id: dict[str, deque[str]] = defaultdict(deque)
    for _, row in rows:
        by_id[_key(row["question_id"])].append(row["text"])
    texts: list[str | None] = []
    missing = []
    for q in questions:
        queue = by_id.get(_key(llava_id(q)))
        texts.append(queue.popleft() if queue else None)
        if texts[-1] is None:
            missing.append(q)
    extra = [qid for qid, queue in by_id.items() for _ in queue]
    if extra:
        log.warning("%s: %d answer line(s) match no question of the task and are not scored (question_id %s%s)",
                    path, len(extra), ", ".join(extra[:5]), ", ..." if len(extra) > 5 else "")
    if missing:
        first = ", ".join(repr(llava_id(q)) for q in missing[:5])
        if not missing_as_wrong:
            raise EvalDataError(path, None, f"no answer for {len(missing)} of the {len(questions)} questions "
                                            f"(question_id {first}{', ...' if len(missing) > 5 else ''}); "
                                            "--missing-as-wrong scores them as wrong answers")
        log.warning("%s: no answer for %d of the %d questions (question_id %s%s): counted wrong", path,
                    len(missing), len(questions), first, ", ..." if len(missing) > 5 else "")
    return [unanswered(q) if t is None else t for q, t in zip(questions, texts)]
