"""ScienceQA-IMG, MMBench (en, cn) and SEED-Bench read from Hub parquet (Task.load_hub) give the questions,
answers files, scores and submission files that LLaVA's layout gives for the same questions.

Each test writes the layout's questions (tests/eval/layout_*.py) a second time as the Hub dataset holds them:
the repository's folder and file names, its columns and their types, null where pandas read NaN, images as
{"bytes", "path"} structs. A decoy shard of another split or config sits next to the one read (MMBench,
ScienceQA), so the task's file pattern is checked too. `--data hub` goes through huggingface_hub's offline
cache. ScienceQA's rows have no problem id: there everything but the ids is compared.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hub_parquet import IMAGE, hub_cache, offline_cache, same_questions, score_both, write_shards
from layout_bench import make_mmbench, make_mmbench_cn, make_seed
from layout_vqa import make_scienceqa
from PIL import Image

from fastllava.eval.hub import read_rows
from fastllava.eval.judge import Judge
from fastllava.eval.run import main, write_answers
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.mmbench import MMBench, MMBenchCN, read_tsv
from fastllava.eval.tasks.scienceqa import ScienceQA
from fastllava.eval.tasks.seed import SEED

# lmms-lab/MMBench_EN (dev: mmbench_dev_20230712.tsv's rows) and lmms-lab/MMBench_CN: columns as their cards.
_TEXT = pa.string()
MMBENCH_EN_SCHEMA = pa.schema([("index", pa.int64()), ("question", _TEXT), ("hint", _TEXT), ("A", _TEXT), ("B", _TEXT),
                               ("C", _TEXT), ("D", _TEXT), ("answer", _TEXT), ("category", _TEXT), ("image", IMAGE),
                               ("source", _TEXT), ("l2-category", _TEXT), ("comment", _TEXT), ("split", _TEXT)])
MMBENCH_CN_SCHEMA = pa.schema([("index", pa.int32()), ("question", _TEXT), ("image", IMAGE), ("hint", _TEXT),
                               ("A", _TEXT), ("B", _TEXT), ("C", _TEXT), ("D", _TEXT), ("answer", _TEXT),
                               ("category", _TEXT), ("source", _TEXT), ("L2-category", _TEXT), ("comment", _TEXT),
                               ("split", _TEXT)])
# lmms-lab/SEED-Bench: SEED-Bench.json's fields, "image" a list (the frames of a video question).
SEED_SCHEMA = pa.schema([("answer", _TEXT), ("choice_a", _TEXT), ("choice_b", _TEXT), ("choice_c", _TEXT),
                         ("choice_d", _TEXT), ("data_id", _TEXT), ("data_type", _TEXT), ("question", _TEXT),
                         ("question_id", _TEXT), ("question_type_id", pa.int16()), ("image", pa.list_(IMAGE))])
# lmms-lab/ScienceQA (derek-thomas/ScienceQA's columns), configs ScienceQA-IMG and ScienceQA-FULL.
SQA_SCHEMA = pa.schema([("image", IMAGE), ("question", _TEXT), ("choices", pa.list_(_TEXT)), ("answer", pa.int8()),
                        ("hint", _TEXT), ("task", _TEXT), ("grade", _TEXT), ("subject", _TEXT), ("topic", _TEXT),
                        ("category", _TEXT), ("skill", _TEXT), ("lecture", _TEXT), ("solution", _TEXT)])


def shards(folder, split, rows, schema, n=2):
    """write_shards, named <split>-0000k-of-0000n.parquet as the repository names that split's files."""
    staging = folder / f".{split}"
    write_shards(staging, rows, schema, shards=n)
    for path in staging.glob("test-*.parquet"):
        path.rename(folder / path.name.replace("test-", f"{split}-", 1))
    staging.rmdir()


def same_pixels(hub, layout):
    """Each question's one image, decoded from the row and from the layout (an encoded image or a file)."""
    for h, lay in zip(hub, layout, strict=True):
        assert len(h.images) == len(lay.images) == 1
        with Image.open(lay.images[0]) if isinstance(lay.images[0], Path) else nullcontext(lay.images[0].open()) as im:
            assert np.array_equal(np.asarray(h.images[0].open()), np.asarray(im.convert("RGB")))


def answers_of(tmp_path, name, questions, texts):
    path = tmp_path / f"answers_{name}.jsonl"
    write_answers(path, questions, texts, "m")
    return path


# -------------------------------------------------------------------------------------------- MMBench

def mmbench_parquet(tsv, root, schema):
    """The TSV's rows (circular copies included) as Hub rows: "nan" and empty cells null, the base64 image
    cell decoded to its file bytes; a decoy test split beside the dev split."""
    _, rows = read_tsv(tsv)
    names = schema.names
    out = []
    for _, row in rows:
        cells = {c: (None if row.get(c, "") in ("", "nan") else row[c]) for c in names}
        cells["index"] = int(row["index"])
        cells["image"] = {"bytes": base64.b64decode(row["image"]), "path": None}
        cells["l2-category" if "l2-category" in names else "L2-category"] = row["l2-category"]
        out.append(cells)
    shards(root / "data", "dev", out, schema)
    decoy = {**out[0], "index": 99, "question": "a test-split question", "answer": None, "split": "test"}
    shards(root / "data", "test", [decoy], schema, n=1)
    return root


@pytest.mark.parametrize("task, make, folder, schema", [
    (MMBench, make_mmbench, "mmbench", MMBENCH_EN_SCHEMA),
    (MMBenchCN, make_mmbench_cn, "mmbench_cn", MMBENCH_CN_SCHEMA),
], ids=["en", "cn"])
def test_mmbench_from_hub_parquet_equals_llava_layout(tmp_path, task, make, folder, schema):
    layout = make(tmp_path / "l")
    hub = mmbench_parquet(layout / folder / f"{task.split}.tsv", tmp_path / "hub", schema)
    from_hub = task().load_hub(read_rows(hub, task.hub))
    from_layout = task().load(layout)
    assert [(q.question_id, q.text, q.record, q.truth) for q in from_hub] == \
           [(q.question_id, q.text, q.record, q.truth) for q in from_layout]
    same_pixels(from_hub, from_layout)
    # Every rotation of every row (--all-rounds): the same rounds from both.
    rounds_hub = task(all_rounds=True).load_hub(read_rows(hub, task.hub))
    rounds_layout = task(all_rounds=True).load(layout)
    assert len(rounds_hub) > len(from_hub)
    assert [(q.question_id, q.text, q.truth) for q in rounds_hub] == \
           [(q.question_id, q.text, q.truth) for q in rounds_layout]
    texts = ["A", "D. red", "red", "B", "B", "B"][:len(from_layout)]
    a_hub, a_layout = answers_of(tmp_path, "hub", from_hub, texts), answers_of(tmp_path, "layout", from_layout, texts)
    assert a_hub.read_bytes() == a_layout.read_bytes()
    by_layout, by_hub = score_both(tmp_path, task.name, layout, hub, a_layout)
    assert by_hub == by_layout and "circular_accuracy" in by_hub
    upload = f"answers_upload/{task.split}.tsv"  # the submission table, byte for byte
    assert (tmp_path / "hub" / upload).read_bytes() == (tmp_path / "layout" / upload).read_bytes()
    with open(tmp_path / "hub" / upload, newline="", encoding="utf-8") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) == 1 + len(from_layout)  # the decoy test row is not read


def test_mmbench_cn_offline_from_the_hub_cache(tmp_path, monkeypatch):
    layout = make_mmbench_cn(tmp_path / "l")
    hub = mmbench_parquet(layout / "mmbench_cn" / f"{MMBenchCN.split}.tsv", tmp_path / "hub", MMBENCH_CN_SCHEMA)
    cache = tmp_path / "hf"
    hub_cache(cache, "lmms-lab/MMBench_CN", {f"data/{p.name}": p.read_bytes() for p in (hub / "data").iterdir()})
    offline_cache(monkeypatch, cache)
    answers = answers_of(tmp_path, "layout", MMBenchCN().load(layout), ["C", "B", "A"])
    by_layout, by_hub = score_both(tmp_path, "mmbench_cn", layout, "hub", answers)
    assert by_hub == by_layout == {"circular_accuracy": 100.0}


def test_mmbench_bad_hub_rows_are_named(tmp_path):
    hub = mmbench_parquet(make_mmbench(tmp_path / "l") / "mmbench" / f"{MMBench.split}.tsv", tmp_path / "hub",
                          MMBENCH_EN_SCHEMA)
    rows = read_rows(hub, MMBench.hub)
    rows[1][2]["answer"] = "E"
    with pytest.raises(EvalDataError, match=r"dev-00000-of-00002.parquet: row 1: column answer: expected one of A, "
                                            r"B, C, D, got 'E'"):
        MMBench().load_hub(rows)
    rows = read_rows(hub, MMBench.hub)
    rows[3][2]["index"] = rows[0][2]["index"]
    with pytest.raises(EvalDataError, match=r"dev-00001-of-00002.parquet: row 0: index 0 repeats "
                                            r"dev-00000-of-00002.parquet row 0"):
        MMBench().load_hub(rows)


# -------------------------------------------------------------------------------------------- SEED-Bench

def seed_parquet(layout, root):
    """make_seed's questions as lmms-lab/SEED-Bench rows (SEED-Bench.json's fields, the image file's bytes);
    the video question with three frames of its own."""
    bench = layout / "seed_bench"
    annotation = json.loads((bench / "SEED-Bench.json").read_text())
    images = {json.loads(line)["question_id"]: bench / json.loads(line)["image"]
              for line in (bench / "llava-seed-bench.jsonl").read_text().splitlines()}
    rows = []
    for q in annotation["questions"]:
        frames = 1 if q["data_type"] == "image" else 3
        rows.append({**{k: q[k] for k in SEED_SCHEMA.names if k != "image"},
                     "image": [{"bytes": images[q["question_id"]].read_bytes(), "path": None}] * frames})
    shards(root / "data", "test", rows, SEED_SCHEMA)
    return root


def image_questions_only(layout):
    """The layout without its video question: the questions the Hub rows give."""
    bench = layout / "seed_bench"
    annotation = json.loads((bench / "SEED-Bench.json").read_text())
    annotation["questions"] = [q for q in annotation["questions"] if q["data_type"] == "image"]
    (bench / "SEED-Bench.json").write_text(json.dumps(annotation))
    lines = [line for line in (bench / "llava-seed-bench.jsonl").read_text().splitlines()
             if json.loads(line)["category"] == "image"]
    (bench / "llava-seed-bench.jsonl").write_text("".join(line + "\n" for line in lines))
    return layout


def test_seed_from_hub_parquet_equals_llava_layout_on_the_image_questions(tmp_path, caplog):
    layout = make_seed(tmp_path / "l")
    hub = seed_parquet(layout, tmp_path / "hub")
    image_questions_only(layout)
    with caplog.at_level(logging.WARNING):
        from_hub = SEED().load_hub(read_rows(hub, SEED.hub))
    assert "1 video question(s) of the Hub rows skipped" in caplog.text
    from_layout = SEED().load(layout)
    assert len(from_layout) == 2
    same_questions(from_hub, from_layout)
    texts = ["B", "A"]
    a_hub, a_layout = answers_of(tmp_path, "hub", from_hub, texts), answers_of(tmp_path, "layout", from_layout, texts)
    assert a_hub.read_bytes() == a_layout.read_bytes()
    by_layout, by_hub = score_both(tmp_path, "seed", layout, hub, a_layout)
    assert by_hub == by_layout and by_hub["image_accuracy"] == 50.0 and by_hub["Instances Counting"] == 100.0
    upload = "answers_upload/seed.jsonl"
    assert (tmp_path / "hub" / upload).read_bytes() == (tmp_path / "layout" / upload).read_bytes()


def test_seed_bad_hub_rows_are_named(tmp_path):
    hub = seed_parquet(make_seed(tmp_path / "l"), tmp_path / "hub")
    rows = read_rows(hub, SEED.hub)
    rows[0][2]["image"] = rows[0][2]["image"] * 2
    with pytest.raises(EvalDataError, match=r"test-00000-of-00002.parquet: row 0: expected one image for an image "
                                            r"question, got 2"):
        SEED().load_hub(rows)
    rows = read_rows(hub, SEED.hub)
    rows[1][2]["question_type_id"] = 13
    with pytest.raises(EvalDataError, match=r"row 1: expected question_type_id 1-12 and answer A-D, got 13, 'C'"):
        SEED().load_hub(rows)


# -------------------------------------------------------------------------------------------- ScienceQA

def sqa_parquet(layout, root):
    """lmms-lab/ScienceQA's ScienceQA-IMG test rows for the layout's image problems, in pid order (problems.json's
    fields, the image file's bytes); decoys in ScienceQA-IMG's validation split and in ScienceQA-FULL."""
    sqa = layout / "scienceqa"
    problems = json.loads((sqa / "problems.json").read_text())
    rows = []
    for pid in json.loads((sqa / "pid_splits.json").read_text())["test"]:
        p = problems[pid]
        if p["image"] is not None:
            image = (sqa / "images" / "test" / pid / p["image"]).read_bytes()
            cells = {k: p[k] for k in SQA_SCHEMA.names if k != "image"}
            rows.append({**cells, "image": {"bytes": image, "path": None}})
    shards(root / "ScienceQA-IMG", "test", rows, SQA_SCHEMA)
    decoy = {**rows[0], "question": "a decoy", "answer": 0}
    shards(root / "ScienceQA-IMG", "validation", [decoy], SQA_SCHEMA, n=1)
    shards(root / "ScienceQA-FULL", "test", [decoy], SQA_SCHEMA, n=1)
    return root


def image_problems_only(layout):
    """The layout's test split cut to its image problems ("5", "11"): the problems ScienceQA-IMG holds."""
    sqa = layout / "scienceqa"
    entries = json.loads((sqa / "llava_test_CQM-A.json").read_text())
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps([e for e in entries if "image" in e]))
    splits = json.loads((sqa / "pid_splits.json").read_text())
    (sqa / "pid_splits.json").write_text(json.dumps({**splits, "test": [e["id"] for e in entries if "image" in e]}))
    return layout


def test_scienceqa_img_from_hub_parquet_equals_llava_layout_but_for_the_ids(tmp_path):
    layout = make_scienceqa(tmp_path / "l")
    hub = sqa_parquet(layout, tmp_path / "hub")
    image_problems_only(layout)
    from_hub = ScienceQA().load_hub(read_rows(hub, ScienceQA.hub))
    from_layout = ScienceQA().load(layout)
    # The rows carry no pid: "hub-<n>" by position, here in the layout's (pid) order.
    ids = {"5": "hub-0", "11": "hub-1"}
    assert [q.question_id for q in from_hub] == [ids[q.question_id] for q in from_layout]
    assert [(q.text, q.record) for q in from_hub] == [(q.text, q.record) for q in from_layout]
    same_pixels(from_hub, from_layout)
    key_hub, key_layout = from_hub[0].truth["key"], from_layout[0].truth["key"]
    assert key_hub["pids"] == [ids[p] for p in key_layout["pids"]]
    assert key_hub["problems"] == {ids[p]: v for p, v in key_layout["problems"].items()}
    texts = ["The answer is B.", "D."]
    a_hub, a_layout = answers_of(tmp_path, "hub", from_hub, texts), answers_of(tmp_path, "layout", from_layout, texts)

    def lines(path):  # the answers file but for question_id and the answer_id derived from it
        return [{k: v for k, v in json.loads(x).items() if k not in ("question_id", "answer_id")}
                for x in path.read_text().splitlines()]
    assert lines(a_hub) == lines(a_layout)
    scores = []
    for name, data, answers in (("layout", layout, a_layout), ("hub", hub, a_hub)):
        assert main(["--task", "scienceqa", "--data", str(data), "--answers", str(answers),
                     "--output", str(tmp_path / name)]) == 0
        scores.append(json.loads((tmp_path / name / "scores.json").read_text())["scores"])
    # With the per-class table (the CLI's scienceqa): accuracy = img_accuracy = IMG = 50, NAT, TXT, G1-6 too.
    assert scores[1] == scores[0] and scores[1]["img_accuracy"] == scores[1]["accuracy"] == scores[1]["IMG"] == 50.0
    result_layout, result_hub = (json.loads((tmp_path / n / "scienceqa_result.json").read_text())
                                 for n in ("layout", "hub"))
    assert result_hub["results"] == {ids[p]: v for p, v in result_layout["results"].items()}
    assert (result_hub["acc"], result_hub["count"]) == (result_layout["acc"], result_layout["count"]) == (50.0, 2)


def test_scienceqa_bad_hub_rows_and_formats_are_named(tmp_path):
    hub = sqa_parquet(make_scienceqa(tmp_path / "l"), tmp_path / "hub")
    rows = read_rows(hub, ScienceQA.hub)
    rows[1][2]["answer"] = 4
    with pytest.raises(EvalDataError, match=r"ScienceQA-IMG/test-00001-of-00002.parquet: row 0: expected an image, "
                                            r"2-5 choices and an answer index among them, got 4 choices, answer 4"):
        ScienceQA().load_hub(rows)
    with pytest.raises(ValueError, match="format QCM-LEA needs the layout"):
        ScienceQA(question_format="QCM-LEA").load_hub(read_rows(hub, ScienceQA.hub))


def test_scienceqa_judge_ensemble_from_hub_rows_equals_llava_layout(fake, tmp_path):
    """The paper's "GPT-4 as the judge" from the rows' answer key: the judge gets the same questions, the
    scores are the layout's; the language-only answers are keyed by the Hub ids."""
    server = fake(lambda body: (200, "The answer is D." if "snow" in body["messages"][1]["content"] else "No idea."))
    layout = make_scienceqa(tmp_path / "l")
    hub = sqa_parquet(layout, tmp_path / "hub")
    image_problems_only(layout)
    language = {"5": "The answer is A.", "11": "The answer is D."}  # both disagree with the model below
    scores, messages = [], []
    for name, ids in (("layout", {"5": "5", "11": "11"}), ("hub", {"5": "hub-0", "11": "hub-1"})):
        path = tmp_path / f"language_{name}.json"
        path.write_text(json.dumps({"outputs": {ids[p]: text for p, text in language.items()}}))
        task = ScienceQA(breakdown=True, judge=Judge(server.url, "gpt-4", sleep=lambda s: None), language_only=path)
        qs = task.load(layout) if name == "layout" else task.load_hub(read_rows(hub, ScienceQA.hub))
        start = len(server.requests)
        scores.append(task.score(qs, ["The answer is B.", "D."], tmp_path / name))
        messages.append([r["body"]["messages"] for r in server.requests[start:]])
    assert scores[1] == scores[0] and scores[1]["judged_accuracy"] == 100.0 and scores[1]["accuracy"] == 50.0
    assert len(messages[1]) == 2 and messages[1] == messages[0]


# ------------------------------------------------------------------------------------ answered by a model

@pytest.mark.parametrize("task", ["mmbench", "seed", "scienceqa"])
def test_a_model_answers_the_hub_rows_as_it_answers_the_layout(task, llava_dir, tmp_path):
    """python -m fastllava.eval --model end to end on the Hub rows (images decoded from the rows, through the
    generator) writes the layout's answers file. (The tiny model's 3-token answers hardly depend on the
    pixels: those are compared in the tests above.)"""
    if task == "mmbench":
        layout = make_mmbench(tmp_path / "l")
        hub = mmbench_parquet(layout / "mmbench" / f"{MMBench.split}.tsv", tmp_path / "hub", MMBENCH_EN_SCHEMA)
    elif task == "seed":
        layout = make_seed(tmp_path / "l")
        hub = seed_parquet(layout, tmp_path / "hub")
        image_questions_only(layout)
    else:
        layout = make_scienceqa(tmp_path / "l")
        hub = sqa_parquet(layout, tmp_path / "hub")
        image_problems_only(layout)
    answers = []
    for name, data in (("layout", layout), ("hub", hub)):
        assert main(["--model", str(llava_dir), "--task", task, "--data", str(data), "--output", str(tmp_path / name),
                     "--max-new-tokens", "3"]) == 0
        lines = [json.loads(x) for x in (tmp_path / name / "answers.jsonl").read_text().splitlines()]
        # ScienceQA's Hub ids are "hub-<n>" (and answer_id derives from the id): compare the rest.
        answers.append([{k: v for k, v in a.items() if task != "scienceqa" or k not in ("question_id", "answer_id")}
                        for a in lines])
    assert answers[1] == answers[0] and len(answers[0]) >= 2
