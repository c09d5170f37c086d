"""Turn a model's answer into LLaVA training turns, or say why it cannot be used.

The answer format our default prompts ask for (LLaVA's complex-reasoning examples use it):

    Question:
    How many dogs are there?
    ===
    Answer:
    Two.
    ===
    Question:
    ...

blocks separated by lines holding only "===", each starting with "Question:" or "Answer:" (the marker
may share its line with the text). An answer whose first character is "{" is read in the other format
LLaVA's conversation prompts have used, one JSON object a line:

    {"question": "How many dogs are there?", "answer": "Two."}

so a prompt folder of either kind can be pointed at. `conversation` needs alternating Question/Answer
blocks starting with a question and ending with an answer; `reasoning` exactly one of each; `detail` is
the answer text itself, with the question drawn from the instruction list. Any answer that mentions raw box coordinates
("[0.12, 0.4, ...") is rejected: the image-grounded model cannot know them.
"""

from __future__ import annotations

import json
import re

from ..data.files import IMAGE_TAG
from .messages import detail_instruction

_SEPARATOR = re.compile(r"^[ \t]*===+[ \t]*$", re.MULTILINE)
_MARKER = re.compile(r"^\s*(question|answer)\s*:\s*", re.IGNORECASE)
# "[0.574, 0.298" (two or more numbers in [0, 1] with a decimal point, in brackets): a box or a point.
COORDINATES = re.compile(r"\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+")


class Invalid(ValueError):
    """An unusable answer: `reason` is the counting category, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_turns(text: str) -> list[tuple[str, str]]:
    """[("question" | "answer", text), ...] of a Question/Answer formatted answer; raises Invalid."""
    turns = []
    for j, block in enumerate(b for b in _SEPARATOR.split(text) if b.strip()):
        m = _MARKER.match(block)
        if m is None:
            raise Invalid("format", f"block {j} does not start with 'Question:' or 'Answer:': {block.strip()[:80]!r}")
        body = block[m.end():].strip()
        if not body:
            raise Invalid("empty_turn", f"block {j} ({m.group(1)}) is empty")
        turns.append((m.group(1).lower(), body))
    return turns


def parse_json_lines(text: str) -> list[tuple[str, str]]:
    """The same turns from the JSON-lines format; raises Invalid."""
    turns = []
    for j, line in enumerate(line for line in text.splitlines() if line.strip()):
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise Invalid("format", f"line {j} is not a JSON object ({e.msg}): {line.strip()[:80]!r}") from None
        if not isinstance(pair, dict) or not {"question", "answer"} <= set(pair):
            raise Invalid("format", f"line {j} is not a {{'question', 'answer'}} object: {line.strip()[:80]!r}")
        for role in ("question", "answer"):
            if not isinstance(pair[role], str) or not pair[role].strip():
                raise Invalid("empty_turn", f"line {j}: the {role} is empty or not a string")
            turns.append((role, pair[role].strip()))
    return turns


def to_conversations(kind: str, image_id: str, answer: str | None) -> list[dict[str, str]]:
    """LLaVA "conversations" for one image from the model's `answer`: alternating human/gpt turns, with
    "<image>\\n" at the front of the first human turn. Raises Invalid(reason, detail)."""
    if answer is None or not answer.strip():
        raise Invalid("empty", "the model returned no text")
    m = COORDINATES.search(answer)
    if m is not None:
        raise Invalid("coordinates", f"the answer mentions box coordinates: {answer[max(m.start() - 30, 0):m.end() + 20]!r}")
    if IMAGE_TAG in answer:
        raise Invalid("image_tag", f"the answer contains the {IMAGE_TAG} tag")
    if kind == "detail":
        if _MARKER.match(answer):
            raise Invalid("format", "a detail answer is a description, not a Question/Answer block")
        pairs = [(detail_instruction(image_id), answer.strip())]
    else:
        turns = parse_json_lines(answer) if answer.lstrip().startswith("{") else parse_turns(answer)
        if not turns:
            raise Invalid("empty", "the answer holds only separators")
        for j, (role, _) in enumerate(turns):
            expected = "question" if j % 2 == 0 else "answer"
            if role != expected:
                raise Invalid("roles", f"block {j} is an {role}; blocks must alternate question, answer, ...")
        if len(turns) % 2:
            raise Invalid("roles", f"{len(turns)} blocks: the last question has no answer")
        if kind == "reasoning" and len(turns) != 2:
            raise Invalid("roles", f"a reasoning answer is one question and one answer, got {len(turns) // 2} pairs")
        pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    out = []
    for i, (question, reply) in enumerate(pairs):
        out.append({"from": "human", "value": (IMAGE_TAG + "\n" if i == 0 else "") + question})
        out.append({"from": "gpt", "value": reply})
    return out
