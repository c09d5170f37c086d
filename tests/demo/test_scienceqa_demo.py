"""The ScienceQA demo (fastllava/demo/scienceqa.py): its release is well-formed ScienceQA, checked against
ScienceQA's own rules and against the drawn scenes; and a reduced run goes through conversion, the real
trainer and `python -m fastllava.eval --task scienceqa`, producing a score for every column of the table."""

from __future__ import annotations

import json
import random

from PIL import Image

from fastllava.data.scienceqa import problem_error
from fastllava.demo.scienceqa import COUNTS, KINDS, main, make_problem, make_release
from fastllava.demo.world import COLORS, DEFAULT_IMAGE_SIZES, SHAPES, draw_scene
from fastllava.eval.scorers import SCIENCEQA_SUBSETS, scienceqa_subsets


def test_release_is_wellformed_scienceqa(tmp_path):
    root = make_release(tmp_path / "r", n_train=24, n_test=12, n_val=6, seed=3)
    problems = json.loads((root / "problems.json").read_text())
    splits = json.loads((root / "pid_splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 6, "test": 12}
    assert sorted(p for v in splits.values() for p in v) == sorted(problems)
    columns = set()
    for split, pids in splits.items():
        for pid in pids:
            p = problems[pid]
            assert problem_error(p) is None and p["split"] == split
            assert 2 <= len(p["choices"]) <= 5 and len(set(p["choices"])) == len(p["choices"])
            assert p["subject"] in ("natural science", "social science", "language science")
            assert p["lecture"] and p["solution"] and p["category"] in KINDS
            if p["image"] is not None:
                with Image.open(root / "images" / split / pid / p["image"]) as im:
                    assert im.size in DEFAULT_IMAGE_SIZES
            else:
                assert not (root / "images" / split / pid).exists()
            columns.update(scienceqa_subsets(p))
    assert columns == set(SCIENCEQA_SUBSETS)  # every column of the paper's table has problems
    # Deterministic for a seed.
    again = make_release(tmp_path / "r2", n_train=24, n_test=12, n_val=6, seed=3)
    assert (again / "problems.json").read_text() == (root / "problems.json").read_text()


def test_answers_follow_the_drawn_scene(tmp_path):
    # make_problem draws with the rng first: replaying the same stream gives the scene it was asked about.
    for kind, truth in (("color", lambda s: list(COLORS).index(s[0].color)),
                        ("shape", lambda s: SHAPES.index(s[0].kind)),
                        ("count", lambda s: COUNTS.index(str(len(s))))):
        for seed in range(5):
            p = make_problem("7", kind, "train", random.Random(seed), tmp_path)
            rng = random.Random(seed)
            _, shapes = draw_scene(rng, rng.choice(DEFAULT_IMAGE_SIZES))
            assert p["answer"] == truth(shapes), (kind, seed)
    word = make_problem("8", "word", "test", random.Random(0), tmp_path)
    name = word["question"].split('"')[1]
    assert word["choices"][word["answer"]] == ("a color" if name in COLORS else "a shape")


def test_reduced_run_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # No loader worker processes: forked from a pytest process that has run other in-process trainings
    # (their threads), a worker can deadlock; the demo itself runs in a fresh process.
    status = main(["--out", str(out), "--train", "48", "--test", "12", "--steps", "3", "--max-new-tokens", "8",
                   "--no-progress", "demo.samples=32", "demo.eval_samples=1", "demo.tower_steps=1",
                   "demo.tower_batch=8", "data.num_workers=0"])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    printed = captured.out
    scores = json.loads((out / "scores" / "scores.json").read_text())["scores"]
    assert set(scores) == {"accuracy", "img_accuracy", *SCIENCEQA_SUBSETS}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert "| G7-12 |" in printed and "chance" in printed
    answers = [json.loads(line) for line in (out / "scores" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and not answers[0]["prompt"].endswith("directly.")  # the paper's QCM-LEA protocol
