"""Held-out visual question answering: greedy decoding with the library's generator and exact-match
scoring per question type.

Every gpt turn of the evaluation file is one question. Its prompt is the conversation up to that turn,
earlier answers taken from the file (teacher forcing), ending with "ASSISTANT:", tokenized by
`tokenize_prompt`, the tokenization training used: the model sees exactly the context it was trained to
answer from. `model.generate` (fastllava.generate: packed prefill, KV-cache decoding) answers them all,
each answer ending where the template's stop rule says (Template.stop_ids: EOS or the template's marker).
With several processes each rank answers questions rank, rank + N, ... and the answers are gathered back
in question order, so the scores are those of one process.

An answer is right when, normalized (lower case, articles and punctuation dropped, number words as
digits), it equals the normalized reference. The question type of each turn comes from the sample's
"question_types" list (one entry per gpt turn, as demo/world.py writes); without it the type is "all".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """The form answers are compared in: 'The Top-Left.' -> 'top left', 'Three' -> '3'."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


@dataclass
class Question:
    """One held-out answer to generate: the prompt that precedes it and the reference answer."""

    sample_id: str
    qtype: str
    turn: int  # index of the gpt turn within the sample
    prompt_ids: list[int]  # BOS ... "ASSISTANT:" with ONE image token per image
    pixel_values: torch.Tensor | None  # (n_images, 3, S, S)
    truth: str


def build_questions(
    samples: Sequence[dict],
    encode: Callable[[list[dict]], list[int]],
    load_pixels: Callable[[str | list[str]], torch.Tensor],
    *,
    source: str = "eval file",
) -> list[Question]:
    """One Question per gpt turn. encode(turns ending with a human turn) -> prompt ids;
    load_pixels(image) -> (n, 3, S, S)."""
    questions = []
    for index, sample in enumerate(samples):
        sid = str(sample.get("id", index))
        turns = sample.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
            raise ValueError(f"{source}: sample {index} (id {sid!r}) needs human/gpt turn pairs in 'conversations'")
        n_answers = len(turns) // 2
        qtypes = sample.get("question_types", ["all"] * n_answers)
        if len(qtypes) != n_answers:
            raise ValueError(
                f"{source}: sample {index} (id {sid!r}) has {len(qtypes)} question_types for {n_answers} answers"
            )
        pixels = load_pixels(sample["image"]) if sample.get("image") else None
        for k in range(n_answers):
            questions.append(Question(sid, str(qtypes[k]), k, encode(turns[: 2 * k + 1]), pixels,
                                      turns[2 * k + 1]["value"]))
    return questions


def format_table(results: dict) -> str:
    """Per-type accuracy as an aligned text table, overall last."""
    rows = [(t, r["correct"], r["total"]) for t, r in results["per_type"].items()]
    rows.append(("overall", results["correct"], results["num_questions"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'question type':<{max(width, 13)}}  correct  total  accuracy"]
    for name, correct, total in rows:
        acc = 100.0 * correct / total if total else 0.0
        lines.append(f"{name:<{max(width, 13)}}  {correct:>7}  {total:>5}  {acc:7.1f}%")
    return "\n".join(lines)


def _read_samples(eval_json, max_samples: int | None) -> tuple[list[dict], str]:
    if isinstance(eval_json, (str, Path)):
        try:
            samples = json.loads(Path(eval_json).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"evaluate_vqa: {eval_json} is not valid JSON: {e}") from None
        source = str(eval_json)
    else:
        samples, source = list(eval_json), "eval samples"
    samples = samples[:max_samples] if max_samples is not None else samples
    if not samples:
        raise ValueError(f"evaluate_vqa: {source} has no samples")
    return samples, source


def _score(questions: Sequence[Question], answers: Sequence[list[int]], tokenizer, num_examples: int) -> dict:
    per_type: dict[str, dict] = {}
    mistakes = []
    for q, ids in zip(questions, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ok = normalize_answer(text) == normalize_answer(q.truth)
        r = per_type.setdefault(q.qtype, {"correct": 0, "total": 0})
        r["correct"] += ok
        r["total"] += 1
        if not ok and len(mistakes) < num_examples:
            mistakes.append({"id": q.sample_id, "type": q.qtype, "truth": q.truth, "answer": text})
    for r in per_type.values():
        r["accuracy"] = r["correct"] / r["total"]
    correct = sum(r["correct"] for r in per_type.values())
    results = {"accuracy": correct / len(questions), "correct": correct, "num_questions": len(questions),
               "per_type": dict(sorted(per_type.items())), "mistakes": mistakes}
    results["table"] = format_table(results)
    return results


def evaluate_vqa(
    model,
    eval_json: str | Path | Sequence[dict],
    image_folder: str | Path,
    tokenizer,
    template="vicuna_v1",
    *,
    image_mode: str = "pad",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    max_samples: int | None = None,
    num_examples: int = 5,
) -> dict:
    """Greedy-decode every held-out question and score it.

    model: a whole (unsharded) fastllava Llava: `model.generate(prompts, ...)` and `.config.vision.image_size`.
    Under torchrun call it on every rank: each answers its share of the questions, and every rank gets the
    scores. Prompts are tokenized with `template` (tokenize_prompt, as the training data), images loaded
    with `image_mode` at the model's image size; batch_size is the generator's max_batch_size.

    Returns {"accuracy", "correct", "num_questions", "per_type": {type: {"correct", "total", "accuracy"}},
    "table": str, "mistakes": [{"id", "type", "truth", "answer"}, ...] (up to num_examples)}.
    """
    from ..data.images import load_image
    from ..data.templates import get_template
    from ..data.tokenize import tokenize_prompt
    from ..train.distributed import gather_interleaved

    config = model.config
    samples, source = _read_samples(eval_json, max_samples)
    folder, size = Path(image_folder), config.vision.image_size

    def load_pixels(image):
        paths = image if isinstance(image, list) else [image]
        return torch.stack([load_image(folder / p, mode=image_mode, size=size) for p in paths])

    questions = build_questions(samples, lambda turns: tokenize_prompt(turns, tokenizer, template), load_pixels,
                                source=source)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = questions[rank::world]
    answers = model.generate([{"input_ids": q.prompt_ids, "pixel_values": q.pixel_values} for q in mine],
                             max_new_tokens=max_new_tokens, stop=get_template(template).stop_ids(tokenizer),
                             max_batch_size=batch_size)
    return _score(questions, gather_interleaved(answers, rank, world), tokenizer, num_examples)
