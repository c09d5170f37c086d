"""Benchmarks read from Hub parquet (fastllava/eval/hub.py) give the questions, answers files and scores that
LLaVA's layout gives for the same questions.

Each test writes the same questions twice: LLaVA's layout (tests/eval/layout_*.py) and parquet files in the
schema of the Hub dataset lmms-eval's task file names (columns and types as the real datasets have them,
images as {"bytes", "path"} structs, rows in the Hub's order), then compares the questions (ids, prompt,
image pixels, ground truth) and scores the same answers through `--answers`. `--data hub` goes through
huggingface_hub itself, offline, from a Hub cache laid out as huggingface_hub writes it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parquet import IMAGE, hub_cache, offline_cache, same_questions, score_both, write_shards
from layout_bench import MME_ITEMS, make_mme
from layout_vqa import POPE_ITEMS, make_pope

from fastllava.eval.hub import read_rows
from fastllava.eval.run import load_questions, main, write_answers
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.mme import MME
from fastllava.eval.tasks.pope import POPE

POPE_SCHEMA = pa.schema([("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
                         ("answer", pa.string()), ("image_source", pa.string()), ("image", IMAGE),
                         ("category", pa.string())])
MME_SCHEMA = pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("answer", pa.string()), ("category", pa.string())])


def pope_parquet(layout, root):
    """lmms-lab/POPE's rows for make_pope's questions: per split 1.. ids, the Hub's split order (adversarial,
    popular, random), the labels as answers, the layout's image files' bytes."""
    pope = layout / "pope"
    images = {}
    for line in (pope / "llava_pope_test.jsonl").read_text().splitlines():
        images.setdefault(json.loads(line)["image"], (pope / "val2014" / json.loads(line)["image"]).read_bytes())
    names = sorted(images, reverse=True)  # make_pope: the first question of a split on ..310196, then ..015738
    rows = []
    for split in ("adversarial", "popular", "random"):
        for i, (obj, label) in enumerate(POPE_ITEMS[split]):
            article = "an" if obj[0] in "aeiou" else "a"
            rows.append({"id": str(len(rows)), "question_id": str(i + 1), "question": f"Is there {article} {obj} in the image?",
                         "answer": label, "image_source": names[i].removesuffix(".jpg"),
                         "image": {"bytes": images[names[i]], "path": None}, "category": split})
    write_shards(root / "data", rows, POPE_SCHEMA)
    return root


def mme_parquet(layout, root):
    """lmms-lab/MME's rows for make_mme's questions: MME's question with its yes/no sentence (two spaces where
    the ground truth has them), ids without "images/", the layout's image bytes."""
    bench = layout / "MME" / "MME_Benchmark_release_version"
    rows = []
    for category, image, qas in MME_ITEMS:
        for k, (question, answer) in enumerate(qas):
            spaces = "  " if category == "code_reasoning" and k == 1 else " "
            rows.append({"question_id": image.replace("/images/", "/"), "question": f"{question}{spaces}Please answer yes or no.",
                         "answer": answer, "image": {"bytes": (bench / image).read_bytes(), "path": image.split("/")[-1]},
                         "category": category})
    write_shards(root / "data", rows, MME_SCHEMA, shards=3)
    return root


def test_pope_from_hub_parquet_equals_llava_layout(tmp_path):
    layout, hub = make_pope(tmp_path / "l"), pope_parquet(make_pope(tmp_path / "l"), tmp_path / "POPE")
    task = POPE()
    from_hub = task.load_hub(read_rows(hub, task.hub))
    from_layout = task.load(layout)
    same_questions(from_hub, from_layout)
    texts = ["Yes", "Yes", "yes", "No.", "no", "yes"]
    write_answers(tmp_path / "a_hub.jsonl", from_hub, texts, "m")
    write_answers(tmp_path / "a_layout.jsonl", from_layout, texts, "m")
    assert (tmp_path / "a_hub.jsonl").read_bytes() == (tmp_path / "a_layout.jsonl").read_bytes()
    by_layout, by_hub = score_both(tmp_path, "pope", layout, hub, tmp_path / "a_layout.jsonl")
    assert by_hub == by_layout and by_hub["adversarial_accuracy"] == 50.0 and by_hub["random_accuracy"] == 100.0


def test_mme_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_mme(tmp_path / "l")
    hub = mme_parquet(layout, tmp_path / "MME")
    task = MME()
    from_hub = task.load_hub(read_rows(hub, task.hub))
    from_layout = task.load(layout)
    same_questions(from_hub, from_layout)
    texts = ["Yes", "No", "Yes", "Yes", "No, it is not.", "No", "Yes", "no"]
    write_answers(tmp_path / "a_hub.jsonl", from_hub, texts, "m")
    write_answers(tmp_path / "a_layout.jsonl", from_layout, texts, "m")
    assert (tmp_path / "a_hub.jsonl").read_bytes() == (tmp_path / "a_layout.jsonl").read_bytes()
    by_layout, by_hub = score_both(tmp_path, "mme", layout, hub, tmp_path / "a_layout.jsonl")
    assert by_hub == by_layout and by_hub["perception"] == 175.0
    for name in ("existence", "artwork", "code_reasoning"):  # what MME's calculation.py reads, byte for byte
        assert (tmp_path / "hub" / "mme_results" / f"{name}.txt").read_bytes() == \
               (tmp_path / "layout" / "mme_results" / f"{name}.txt").read_bytes()


def test_data_hub_reads_the_cache_offline_through_huggingface_hub(tmp_path, monkeypatch):
    layout = make_pope(tmp_path / "l")
    hub = pope_parquet(layout, tmp_path / "POPE")
    cache = tmp_path / "hf"
    hub_cache(cache, "lmms-lab/POPE", {f"data/{p.name}": p.read_bytes() for p in (hub / "data").iterdir()})
    offline_cache(monkeypatch, cache)
    write_answers(tmp_path / "a.jsonl", POPE().load(layout), ["yes", "no", "no", "no", "yes", "yes"], "m")
    by_layout, by_hub = score_both(tmp_path, "pope", layout, "hub", tmp_path / "a.jsonl")
    assert by_hub == by_layout and by_hub["f1"] > 0
    # Another id, not in the cache, offline: an error naming the dataset.
    with pytest.raises(EvalDataError, match="someone/POPE: not a local folder, and could not fetch the Hub dataset 'someone/POPE'"):
        load_questions(POPE(), "someone/POPE")


def test_bad_hub_rows_and_arguments_are_named(tmp_path, capsys, monkeypatch):
    layout = make_mme(tmp_path / "l")
    hub = mme_parquet(layout, tmp_path / "MME")
    table = pq.read_table(hub / "data" / "test-00000-of-00003.parquet").drop_columns(["category"])
    pq.write_table(table, hub / "data" / "test-00000-of-00003.parquet")
    with pytest.raises(EvalDataError, match=r"test-00000-of-00003.parquet: expected the columns of lmms-lab/MME .*"
                                            r"missing category"):
        read_rows(hub, MME.hub)
    (tmp_path / "x").write_text("")
    # A task outside HUB_TASKS is refused by name (narrowed here: gqa reads Hub rows too).
    monkeypatch.setattr("fastllava.eval.run.HUB_TASKS", ("mme", "pope"))
    with pytest.raises(SystemExit):
        main(["--task", "gqa", "--data", "hub", "--answers", str(tmp_path / "x"), "--output", str(tmp_path / "o")])
    assert "task gqa reads only LLaVA's layout (a directory); the Hub datasets are read for mme, pope" in \
           capsys.readouterr().err


def test_without_pyarrow_one_line_names_the_extra(tmp_path):
    hub = pope_parquet(make_pope(tmp_path / "l"), tmp_path / "POPE")
    (tmp_path / "a.jsonl").write_text("")
    code = ("import sys\nsys.modules['pyarrow'] = sys.modules['pyarrow.parquet'] = None\n"
            "from fastllava.eval.run import main\n"
            f"main(['--task', 'pope', '--data', {str(hub)!r}, '--answers', {str(tmp_path / 'a.jsonl')!r}, "
            f"'--output', {str(tmp_path / 'o')!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: reading benchmarks from Hub parquet files (--data hub) needs the pyarrow package, which is not "
        'installed: pip install "fastllava[hub-eval]"']
