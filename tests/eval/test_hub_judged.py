"""LLaVA-Bench-in-the-Wild and MM-Vet read from Hub parquet (lmms-eval's datasets) give the questions, the
answers file, the judge's requests and the judged scores that LLaVA's layout gives for the same questions.

Each test writes the same questions twice: LLaVA's layout (tests/eval/layout_bench.py) and parquet files in
the schema of the Hub dataset lmms-eval's task file names (columns and types as the real datasets'
dataset_info lists them, images as {"bytes", "path"} structs), then judges the same answers file from both
through `python -m fastllava.eval --answers ... --judge-url` against the loopback judge of test_judge.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parquet import IMAGE, hub_cache, offline_cache, same_questions, write_shards
from layout_bench import make_llava_bench, make_mmvet

from fastllava.eval.hub import read_rows
from fastllava.eval.judge import Judge
from fastllava.eval.run import load_questions, main, write_answers
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.judged import LLaVABench, MMVet

# lmms-lab/llava-bench-in-the-wild's dataset_info (one split, "train"; question_id is an int8).
LLAVA_BENCH_SCHEMA = pa.schema([("question_id", pa.int8()), ("question", pa.string()), ("image", IMAGE),
                                ("caption", pa.string()), ("gpt_answer", pa.string()), ("category", pa.string()),
                                ("image_id", pa.string())])
# lmms-lab/MMVet (split test): question_id "v1_<n>", capability comma-separated as lmms-eval's utils.py reads it.
MMVET_SCHEMA = pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                          ("answer", pa.string()), ("image_source", pa.string()), ("capability", pa.string())])
NOWHERE = Judge("http://127.0.0.1:9/v1", "m")  # loading never calls the judge


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def llava_bench_parquet(layout, root):
    """The rows of lmms-lab/llava-bench-in-the-wild for make_llava_bench's questions, in one shard as the Hub
    has it (data/train-00000-of-00001.parquet), in reverse order (load_hub restores LLaVA's): the caption a
    string (a list of sentences joined a sentence a line), the GPT-4 reference as gpt_answer."""
    folder = layout / "llava-bench-in-the-wild"
    captions = {c["image"]: c["caption"] for c in _jsonl(folder / "context.jsonl")}
    references = {r["question_id"]: r["text"] for r in _jsonl(folder / "answers_gpt4.jsonl")}
    rows = [{"question_id": q["question_id"], "question": q["text"],
             "image": {"bytes": (folder / "images" / q["image"]).read_bytes(), "path": q["image"]},
             "caption": "\n".join(c) if isinstance(c := captions[q["image"]], list) else c,
             "gpt_answer": references[q["question_id"]], "category": q["category"], "image_id": q["image"][:-4]}
            for q in reversed(_jsonl(folder / "questions.jsonl"))]
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LLAVA_BENCH_SCHEMA),
                   root / "data" / "train-00000-of-00001.parquet")
    return root


def mmvet_parquet(layout, root):
    """lmms-lab/MMVet's rows for make_mmvet's questions, from mm-vet.json and the images, in two shards."""
    folder = layout / "mm-vet"
    samples = json.loads((folder / "mm-vet.json").read_text())
    rows = [{"question_id": key, "image": {"bytes": (folder / "images" / s["imagename"]).read_bytes(), "path": None},
             "question": s["question"], "answer": s["answer"], "image_source": s["imagename"],
             "capability": ",".join(s["capability"])} for key, s in samples.items()]
    write_shards(root / "data", rows, MMVET_SCHEMA)
    return root


def judge_both(tmp_path, server, task, layout, hub, answers, model):
    """(scores, request bodies as sent) of `--answers answers` judged from the layout, then from the Hub rows."""
    out = []
    for name, data in (("layout", layout), ("hub", hub)):
        start = len(server.requests)
        assert main(["--task", task, "--data", str(data), "--answers", str(answers), "--output", str(tmp_path / name),
                     "--judge-url", server.url, "--judge-model", model]) == 0
        # The judge serializes with json.dumps; dumping the parsed body again gives the bytes it sent.
        out.append((json.loads((tmp_path / name / "scores.json").read_text())["scores"],
                    [json.dumps(r["body"]) for r in server.requests[start:]]))
    return out


def test_llava_bench_from_hub_parquet_equals_llava_layout(tmp_path, fake):
    layout = make_llava_bench(tmp_path / "l")
    hub = llava_bench_parquet(layout, tmp_path / "LB")
    task = LLaVABench(judge=NOWHERE)
    from_hub, from_layout = task.load_hub(read_rows(hub, task.hub)), task.load(layout)
    # The rows carry no answer_id for the reference: the reviews' answer1_id is the question_id instead.
    assert [q.truth.pop("reference_id") for q in from_hub] == [0, 1, 2]
    assert [q.truth.pop("reference_id") for q in from_layout] == ["ref0", "ref1", "ref2"]
    same_questions(from_hub, from_layout)
    assert from_hub[2].truth["caption"] == "A market stall.\nYellow fruits are piled up."
    texts = ["Diamond Head.", "A crater by a city.", "Tourists buy them."]
    write_answers(tmp_path / "a_hub.jsonl", from_hub, texts, "m")
    write_answers(tmp_path / "a_layout.jsonl", from_layout, texts, "m")
    assert (tmp_path / "a_hub.jsonl").read_bytes() == (tmp_path / "a_layout.jsonl").read_bytes()

    server = fake(lambda body: (200, "8 9\nGood." if "Diamond Head" in body["messages"][1]["content"]
                                else "7 6\nFine."))
    (by_layout, sent_layout), (by_hub, sent_hub) = judge_both(tmp_path, server, "llava_bench", layout, hub,
                                                              tmp_path / "a_layout.jsonl", "gpt-4-0314")
    assert sent_hub == sent_layout and len(sent_hub) == 3
    assert json.loads(sent_hub[2])["messages"][1]["content"].startswith(
        "[Context]\nA market stall.\nYellow fruits are piled up.\n\n[Question]\nWhy might these fruits be sold here?")
    assert by_hub == by_layout and by_hub["conv"] == 112.5 and by_hub["detail"] == 85.7
    reviews = {name: _jsonl(tmp_path / name / "reviews" / "llava_bench.jsonl") for name in ("layout", "hub")}
    assert [r.pop("answer1_id") for r in reviews["hub"]] == [0, 1, 2]
    assert [r.pop("answer1_id") for r in reviews["layout"]] == ["ref0", "ref1", "ref2"]
    assert reviews["hub"] == reviews["layout"]


def test_mmvet_from_hub_parquet_equals_llava_layout(tmp_path, fake):
    layout = make_mmvet(tmp_path / "l")
    hub = mmvet_parquet(layout, tmp_path / "MMVet")
    hub_task, layout_task = MMVet(judge=NOWHERE), MMVet(judge=NOWHERE)
    from_hub = hub_task.load_hub(read_rows(hub, hub_task.hub))
    from_layout = layout_task.load(layout)
    same_questions(from_hub, from_layout)
    assert hub_task._meta == {k: {f: s[f] for f in ("question", "answer", "capability")}
                              for k, s in layout_task._meta.items()}  # what the judge reads: mm-vet.json's fields
    texts = ["x = -1", "a cat", "yes"]
    write_answers(tmp_path / "a_hub.jsonl", from_hub, texts, "m")
    write_answers(tmp_path / "a_layout.jsonl", from_layout, texts, "m")
    assert (tmp_path / "a_hub.jsonl").read_bytes() == (tmp_path / "a_layout.jsonl").read_bytes()

    server = fake(lambda body: (200, "0.5" if "| x = -1 |" in body["messages"][0]["content"][-40:] else "1.0"))
    (by_layout, sent_layout), (by_hub, sent_hub) = judge_both(tmp_path, server, "mmvet", layout, hub,
                                                              tmp_path / "a_layout.jsonl", "gpt-4-0613")
    assert sent_hub == sent_layout and len(sent_hub) == 3
    assert by_hub == by_layout == pytest.approx({"total": 83.3333, "ocr": 50.0, "math": 50.0, "rec": 100.0,
                                                 "know": 100.0}, abs=1e-3)
    for name in ("mmvet.json", "mmvet_gpt-4-0613-grade-1runs.json", "mmvet_gpt-4-0613-cap-score-1runs.csv"):
        assert (tmp_path / "hub" / "results" / name).read_bytes() == \
               (tmp_path / "layout" / "results" / name).read_bytes()


def test_data_hub_offline_and_reviews_read_capabilities_from_the_rows(tmp_path, monkeypatch):
    """`--data hub` resolves both default ids from a Hub cache holding the real repositories' file names, and
    `--reviews` with `--data hub` scores each capability as with mm-vet.json."""
    layout = make_mmvet(make_llava_bench(tmp_path / "l"))
    lb, mv = llava_bench_parquet(layout, tmp_path / "LB"), mmvet_parquet(layout, tmp_path / "MMVet")
    cache = tmp_path / "hf"
    hub_cache(cache, "lmms-lab/llava-bench-in-the-wild", {"data/train-00000-of-00001.parquet":
                                                          (lb / "data" / "train-00000-of-00001.parquet").read_bytes()})
    hub_cache(cache, "lmms-lab/MMVet", {f"data/{p.name}": p.read_bytes() for p in (mv / "data").iterdir()})
    offline_cache(monkeypatch, cache)
    assert [q.question_id for q in load_questions(LLaVABench(), "hub")] == [0, 1, 2]
    assert [q.question_id for q in load_questions(MMVet(), "hub")] == [0, 1, 2]

    grades = tmp_path / "grades.json"
    grades.write_text(json.dumps({"v1_0": {"score": [0.5, 1.0]}, "v1_1": {"score": [1.0, 1.0]}}))
    scores = {}
    for name, data in (("layout", layout), ("hub", "hub"), ("none", None)):
        args = ["--task", "mmvet", "--reviews", str(grades), "--output", str(tmp_path / name)]
        assert main(args + ([] if data is None else ["--data", str(data)])) == 0
        scores[name] = json.loads((tmp_path / name / "scores.json").read_text())["scores"]
    assert scores["hub"] == scores["layout"] == pytest.approx({"total": 58.3333, "ocr": 75.0, "math": 75.0,
                                                               "rec": 50.0, "know": 0.0}, abs=1e-3)
    assert set(scores["none"]) == {"total"}
    review = tmp_path / "review.jsonl"  # LLaVA-Bench's reviews need no data: --data hub is accepted and unused
    review.write_text(json.dumps({"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 9]}) + "\n")
    assert main(["--task", "llava_bench", "--reviews", str(review), "--data", "hub",
                 "--output", str(tmp_path / "lb")]) == 0
    assert json.loads((tmp_path / "lb" / "scores.json").read_text())["scores"]["conv"] == 112.5


def test_bad_rows_are_named(tmp_path):
    hub = llava_bench_parquet(make_llava_bench(tmp_path / "l"), tmp_path / "LB")
    file = hub / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(file)
    pq.write_table(table.set_column(5, "category", pa.array(["conv", "chat", "detail"])), file)
    with pytest.raises(EvalDataError, match=r"train-00000-of-00001.parquet: row 1: category: expected conv, detail "
                                            r"or complex, got 'chat'"):
        LLaVABench(judge=NOWHERE).load_hub(read_rows(hub, LLaVABench.hub))
    pq.write_table(table.set_column(0, "question_id", pa.array([2, 1, 2], pa.int8())), file)
    with pytest.raises(EvalDataError, match=r"row 2: question_id 2 repeats train-00000-of-00001.parquet row 0"):
        LLaVABench().load_hub(read_rows(hub, LLaVABench.hub))

    hub = mmvet_parquet(make_mmvet(tmp_path / "m"), tmp_path / "MMVet")
    file = hub / "data" / "test-00000-of-00002.parquet"
    table = pq.read_table(file)
    pq.write_table(table.set_column(0, "question_id", pa.array(["v1_0", "sample1"])), file)
    with pytest.raises(EvalDataError, match=r"test-00000-of-00002.parquet: row 1: expected question_id 'v1_<n>' "
                                            r"\(MM-Vet's sample id\).*got 'sample1'"):
        MMVet().load_hub(read_rows(hub, MMVet.hub))
    pq.write_table(table.set_column(0, "question_id", pa.array(["v1_0", "v1_0"])), file)
    with pytest.raises(EvalDataError, match=r"row 1: question_id 'v1_0' repeats test-00000-of-00002.parquet row 0"):
        MMVet().load_hub(read_rows(hub, MMVet.hub))
