"""ScienceQA end to end on CPU: a small ScienceQA-shaped release drawn from the demo world, converted by
fastllava.data.scienceqa, trained by the real trainer, scored by `python -m fastllava.eval --task scienceqa`.

    python -m fastllava.demo.scienceqa [--out DIR] [--steps N] [--train N] [--test N] [section.key=value ...]

The release (`make_release`) has ScienceQA's layout: problems.json, pid_splits.json ({"train", "val",
"test"}) and images/<split>/<pid>/image.png. Its images are the demo world's scenes (world.draw_scene), and
every problem is answered from their exact symbolic description (the drawn Shape list), never from pixels
read back. Six kinds of problem, 2 to 5 choices, covering every column of the paper's table:

    kind   subject  context        grade   choices  question
    color  NAT      IMG            grade2  5        What color are the shapes in the picture?
    shape  NAT      IMG            grade1  3        Which shape is drawn in the picture?
    count  NAT      IMG            grade7  4        How many shapes are in the picture?
    cell   SOC      IMG + TXT      grade8  2        Is there a shape in the <cell> cell?  (hint: the map)
    text   SOC      TXT            grade4  5        What color are the shapes in the text?  (hint: a description)
    word   LAN      NO             grade3/9 2       Is the word "<w>" a color or a shape?

Each has a lecture (one sentence per kind) and a solution (the fact that answers it), so QCM-LEA targets read
"<lecture> <solution> The answer is X.", as in the LLaVA paper's ScienceQA fine-tuning.

`main` then: converts with QCM-LEA; trains stage 2 from the embedded demo's cached tower and random LLM
(demo.run.prepare: its world, components and settings, the same `demo.*` overrides), with a tokenizer trained
on this corpus (world.train_demo_tokenizer: the LLM is at its random initialization, so any vocabulary that fits
serves; the demo world's own has no "(", ")", "B" or "C"); and evaluates the export with the paper's protocol
(--sqa-format QCM-LEA), printing the score table next to the chance level of each column.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from ..extras import cli
from .world import COLORS, DEFAULT_IMAGE_SIZES, POSITIONS, SHAPES, corpus_texts, describe, draw_scene, train_demo_tokenizer

KINDS = ("color", "shape", "count", "cell", "text", "word")
COUNTS = ("1", "2", "3", "4")
LECTURES = {
    "color": "A color is what the eye sees when light falls on a thing.",
    "shape": "A shape is the outline of a thing.",
    "count": "To count the shapes, say one number for each shape.",
    "cell": "A map can be split into four cells: top left, top right, bottom left and bottom right.",
    "text": "A text can tell you what a picture shows.",
    "word": "Some words name colors and some words name shapes.",
}


def _scene_problem(kind: str, shapes, rng: random.Random) -> dict:
    """question, choices, answer, hint, lecture, solution of an image problem about `shapes`."""
    first = shapes[0]
    if kind == "color":
        return dict(question="What color are the shapes in the picture?", choices=list(COLORS),
                    answer=list(COLORS).index(first.color), hint="", solution=f"The shapes are {first.color}.")
    if kind == "shape":
        return dict(question="Which shape is drawn in the picture?", choices=list(SHAPES),
                    answer=SHAPES.index(first.kind), hint="", solution=f"The shapes are {first.kind}s.")
    if kind == "count":
        n = len(shapes)
        return dict(question="How many shapes are in the picture?", choices=list(COUNTS), answer=n - 1, hint="",
                    solution="There is 1 shape." if n == 1 else f"There are {n} shapes.")
    assert kind == "cell"
    cell = rng.randrange(4)
    full = any(s.cell == cell for s in shapes)
    return dict(question=f"Is there a shape in the {POSITIONS[cell]} cell?", choices=["yes", "no"],
                answer=0 if full else 1, hint="The picture is a map with four cells.",
                solution=f"The {POSITIONS[cell]} cell {'holds a shape' if full else 'is empty'}.")


def _text_problem(kind: str, rng: random.Random) -> dict:
    if kind == "text":
        _, shapes = draw_scene(rng, DEFAULT_IMAGE_SIZES[0])  # only its description is used: no image
        color = shapes[0].color
        return dict(question="What color are the shapes in the text?", choices=list(COLORS),
                    answer=list(COLORS).index(color), hint=describe(shapes),
                    solution=f"The text says the shapes are {color}.")
    assert kind == "word"
    word = rng.choice(list(COLORS) + list(SHAPES))
    is_color = word in COLORS
    return dict(question=f'Is the word "{word}" a color or a shape?', choices=["a color", "a shape"],
                answer=0 if is_color else 1, hint="", solution=f"{word} is a {'color' if is_color else 'shape'}.")


_META = {"color": ("natural science", "grade2"), "shape": ("natural science", "grade1"),
         "count": ("natural science", "grade7"), "cell": ("social science", "grade8"),
         "text": ("social science", "grade4"), "word": ("language science", None)}


def make_problem(pid: str, kind: str, split: str, rng: random.Random, images: Path) -> dict:
    """One problems.json entry of `kind`; an image problem's PNG goes to images/<split>/<pid>/image.png."""
    image = None
    if kind in ("color", "shape", "count", "cell"):
        picture, shapes = draw_scene(rng, rng.choice(DEFAULT_IMAGE_SIZES))
        fields = _scene_problem(kind, shapes, rng)
        folder = images / split / pid
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / "image.png")
        image = "image.png"
    else:
        fields = _text_problem(kind, rng)
    subject, grade = _META[kind]
    grade = grade or rng.choice(("grade3", "grade9"))
    topic = {"natural science": "physics", "social science": "geography", "language science": "vocabulary"}[subject]
    return {"question": fields["question"], "choices": fields["choices"], "answer": fields["answer"],
            "hint": fields["hint"], "image": image, "task": "closed choice", "grade": grade, "subject": subject,
            "topic": topic, "category": kind, "skill": kind, "lecture": LECTURES[kind],
            "solution": fields["solution"], "split": split}


def make_release(root: Path, *, n_train: int, n_test: int, n_val: int = 0, seed: int = 0) -> Path:
    """Write a ScienceQA-shaped release under `root` (problems.json, pid_splits.json, images/); pids are
    "1", "2", ... in split order, kinds in turn. Deterministic for a seed. Returns `root`."""
    if min(n_train, n_test) < 1 or n_val < 0:
        raise ValueError(f"make_release: need n_train, n_test >= 1 and n_val >= 0, got {n_train}, {n_test}, {n_val}")
    root = Path(root)
    problems, splits, pid = {}, {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(f"scienceqa-{seed}-{split}")
        splits[split] = []
        for i in range(n):
            pid += 1
            problems[str(pid)] = make_problem(str(pid), KINDS[i % len(KINDS)], split, rng, root / "images")
            splits[split].append(str(pid))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


def chance(problems: dict, pids: Sequence[str]) -> dict[str, float]:
    """Expected accuracy (percent) of a uniform random guess, overall and per table column."""
    from ..eval.scorers import scienceqa_subsets

    sums, counts = {}, {}
    for pid in pids:
        p = 1.0 / len(problems[pid]["choices"])
        for name in ["accuracy"] + scienceqa_subsets(problems[pid]):
            sums[name] = sums.get(name, 0.0) + p
            counts[name] = counts.get(name, 0) + 1
    return {k: 100.0 * sums[k] / counts[k] for k in sums}


def format_scores(scores: dict[str, float], chances: dict[str, float]) -> str:
    """Markdown table: each metric of the eval next to chance."""
    lines = ["| metric | demo model | chance |", "|---|---:|---:|"]
    for name, value in scores.items():
        ref = chances.get(name, chances.get("IMG") if name == "img_accuracy" else None)
        lines.append(f"| {name} | {value:.2f} | {'' if ref is None else f'{ref:.2f}'} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastllava.demo.scienceqa",
        description="ScienceQA end to end on CPU: generate a small ScienceQA-shaped release from the demo world, "
                    "convert it (QCM-LEA), train a tiny LLaVA from the demo's cached components with the real "
                    "trainer, evaluate with `python -m fastllava.eval --task scienceqa`, print the score table.",
        epilog="Trailing section.key=value arguments are the embedded demo's overrides (e.g. demo.seed=1, "
               "optim.lr=3e-3; see `python recipes/finetune.py --help`).")
    parser.add_argument("--out", default="outputs/demo-scienceqa", help="working folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=1800, help="training problems (default: %(default)s)")
    parser.add_argument("--test", type=int, default=300, help="test problems (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of 32 problems (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the release's problems (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length at evaluation")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    for name in ("train", "test", "steps", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected section.key=value overrides, got {' '.join(bad)}")
    return args


def run(args: argparse.Namespace) -> dict:
    """Generate, convert, train, evaluate; returns {"scores", "chance", "table", "export", "seconds"}."""
    from ..data import scienceqa as convert
    from ..eval import run as evaluate
    from ..train import require_extras, train
    from .run import prepare

    start = time.perf_counter()
    out = Path(args.out)
    release, data = out / "release", out / "eval"
    make_release(release, n_train=args.train, n_test=args.test, seed=args.seed)
    status = convert.main(["--problems", str(release / "problems.json"), "--splits", str(release / "pid_splits.json"),
                           "--images", str(release / "images"), "--format", "QCM-LEA", "--out", str(data / "scienceqa")]
                          + (["--no-progress"] if args.no_progress else []))
    if status != 0:
        raise RuntimeError(f"fastllava.data.scienceqa exited with {status}")
    entries = [e for name in ("train_QCM-LEA", "test_QCM-LEA", "test_CQM-A")
               for e in json.loads((data / "scienceqa" / f"llava_{name}.json").read_text())]
    tokenizer_dir = out / "tokenizer"
    train_demo_tokenizer(corpus_texts(entries), tokenizer_dir)

    overrides = list(args.overrides) + ([] if any(o.startswith("logging.progress=") for o in args.overrides)
                                        else [f"logging.progress={str(not args.no_progress).lower()}"])
    cfg, _ = prepare(overrides, "finetune")  # the demo's world and cached components; its VQA scoring is not used
    cfg.model = dataclasses.replace(cfg.model, tokenizer_path=str(tokenizer_dir))
    cfg.model.validate()
    cfg.data = dataclasses.replace(cfg.data, data_path=str(data / "scienceqa" / "llava_train_QCM-LEA.json"),
                                   image_folder=str(release / "images" / "train"))
    cfg.train = dataclasses.replace(cfg.train, max_steps=args.steps, epochs=max(1, -(-args.steps * cfg.train.global_batch_size // args.train)),
                                    output_dir=str(out / "train"))
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, every_steps=0, resume="none")
    require_extras(cfg)  # e.g. logging.wandb=true without wandb: before the model is built
    result = train(cfg)
    if result.export is None:
        raise RuntimeError("training was interrupted before its export")
    status = evaluate.main(["--model", str(result.export), "--task", "scienceqa", "--data", str(data),
                            "--output", str(out / "scores"), "--sqa-format", "QCM-LEA", "--dtype", "fp32",
                            "--device", "cpu", "--max-new-tokens", str(args.max_new_tokens)])
    if status != 0:
        raise RuntimeError(f"python -m fastllava.eval exited with {status}")
    scores = json.loads((out / "scores" / "scores.json").read_text())["scores"]
    problems = json.loads((release / "problems.json").read_text())
    chances = chance(problems, json.loads((release / "pid_splits.json").read_text())["test"])
    return {"scores": scores, "chance": chances, "table": format_scores(scores, chances), "export": result.export,
            "seconds": time.perf_counter() - start}


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nScienceQA demo: {args.train} training problems, {args.steps} steps, {args.test} test problems; "
          f"{result['seconds']:.0f} s wall clock\n{result['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
