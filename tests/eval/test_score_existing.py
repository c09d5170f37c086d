"""`python -m fastllava.eval` without a model: an answers file in LLaVA's format (as its model_vqa*.py
write it, lines in any order across ids) scored with every image file deleted, checked against the task
scoring the same answers in question order and against hand-worked POPE numbers; LLaVA-Bench review files
and MM-Vet grade files scored alone, against hand-worked means."""

import json
import random

import pytest

import layout_bench
import layout_vqa
from fastllava.eval.answers import llava_id
from fastllava.eval.run import main
from fastllava.eval.tasks import TASKS, make_task

MAKERS = {name: getattr(module, f"make_{name}") for module in (layout_vqa, layout_bench)
          for name in TASKS if hasattr(module, f"make_{name}")}
LOCAL = sorted(set(TASKS) - {"llava_bench", "mmvet"})  # the tasks that score answers without a judge


def _mixed_answers(questions):
    """The right answer (from the layout's truth) to two questions in three and "D" to the third, so
    that scores are neither 0 nor 100 and a mis-join shows."""
    def right(q):
        t = q.truth
        if "label" in t:  # POPE
            return t["label"]
        if "answers" in t:  # TextVQA's human answers
            return t["answers"][1]
        if "key" in t:  # ScienceQA's answer index
            return "ABCDE"[t["key"]["problems"][str(q.question_id)][0]]
        return t.get("answer") or "Yes"  # GQA, MME, MMBench, SEED; VQAv2 and VizWiz have no truth here
    return ["D" if i % 3 == 1 else right(q) for i, q in enumerate(questions)]


def _write_llava_answers(path, questions, texts, *, seed=0):
    """LLaVA's answers jsonl (model_vqa_loader.py's fields, a random-looking answer_id), lines shuffled
    across question ids but in file order within one id, as LLaVA's scripts write repeated ids."""
    lines = [{"question_id": llava_id(q), "prompt": q.text, "text": t, "answer_id": f"aid{i:04x}",
              "model_id": "llava-v1.5-13b", "metadata": {}} for i, (q, t) in enumerate(zip(questions, texts))]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    ids = [json.dumps(lines[i]["question_id"]) for i in order]  # the k-th line of an id stays k-th
    by_id = {}
    for line in lines:
        by_id.setdefault(json.dumps(line["question_id"]), []).append(line)
    path.write_text("".join(json.dumps(by_id[k].pop(0)) + "\n" for k in ids), encoding="utf-8")


def _delete_images(data):
    gone = [p for p in data.rglob("*") if p.suffix in (".jpg", ".png")]
    for p in gone:
        p.unlink()
    return len(gone)


def _score(task, data, answers, out, *extra):
    code = main(["--task", task, "--data", str(data), "--answers", str(answers), "--output", str(out), *extra])
    return code, (json.loads((out / "scores.json").read_text()) if code == 0 else None)


@pytest.mark.parametrize("task", LOCAL)
def test_answers_file_scores_as_the_task_does_without_images(task, tmp_path):
    data = MAKERS[task](tmp_path / "data")
    direct = make_task(task, **({"breakdown": True} if task == "scienceqa" else {}))  # as the CLI makes it
    questions = direct.load(data)
    texts = _mixed_answers(questions)
    expected = direct.score(questions, texts, tmp_path / "direct")
    _write_llava_answers(tmp_path / "answers.jsonl", questions, texts)
    assert task.startswith("mmbench") or _delete_images(data) > 0  # MMBench's images are cells of its TSV
    code, scores = _score(task, data, tmp_path / "answers.jsonl", tmp_path / "out")
    assert code == 0
    assert scores["scores"] == expected and scores["model"] == "llava-v1.5-13b"
    assert (tmp_path / "out" / "scores.md").is_file()
    # Every file the task writes (upload tables, converted results) is the one in-order scoring writes.
    written = [p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("*") if p.is_file()]
    for rel in written:
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "direct" / rel).read_bytes(), rel


def test_repeated_ids_join_by_position(tmp_path):
    """TextVQA's question_id is the image id: its two liquor questions take the answers in file order."""
    data = layout_vqa.make_textvqa(tmp_path / "data")
    questions = make_task("textvqa").load(data)
    texts = ["dakota", "bowmore", "10 years", "30"]
    _write_llava_answers(tmp_path / "in_order.jsonl", questions, texts)
    _write_llava_answers(tmp_path / "swapped.jsonl", questions, ["dakota", "10 years", "bowmore", "30"])
    _, in_order = _score("textvqa", data, tmp_path / "in_order.jsonl", tmp_path / "a")
    _, swapped = _score("textvqa", data, tmp_path / "swapped.jsonl", tmp_path / "b")
    assert in_order["scores"] == make_task("textvqa").score(questions, texts, tmp_path / "direct")
    assert swapped["scores"]["accuracy"] < in_order["scores"]["accuracy"]


def _pope_answers(path, answers):
    """LLaVA-format answers for make_pope's questions: {question_id: text}."""
    path.write_text("".join(json.dumps({"question_id": qid, "prompt": "", "text": text, "answer_id": "x",
                                        "model_id": "m", "metadata": {}}) + "\n" for qid, text in answers.items()))


# make_pope's ids (adversarial 1, 2; random 10000001, 10000002; popular 20000001, 20000002) with labels
# yes, no in each split.
POPE_ANSWERS = {20000002: "No, there is not.", 1: "Yes", 10000002: "No", 2: "Yes, there is a backpack.",
                10000001: "Yes", 20000001: "No"}


def test_pope_hand_worked_without_images(tmp_path):
    data = layout_vqa.make_pope(tmp_path / "data")
    _delete_images(data)
    _pope_answers(tmp_path / "answers.jsonl", POPE_ANSWERS)
    code, scores = _score("pope", data, tmp_path / "answers.jsonl", tmp_path / "out")
    assert code == 0
    s = scores["scores"]
    # adversarial: yes/yes against yes/no: tp 1, fp 1 -> precision 1/2, recall 1, F1 2/3, accuracy 1/2.
    assert s["adversarial_f1"] == pytest.approx(200 / 3) and s["adversarial_accuracy"] == 50
    # random: right twice -> F1 1. popular: no/no against yes/no: no yes predicted -> F1 0, accuracy 1/2.
    assert s["random_f1"] == 100 and s["popular_f1"] == 0 and s["popular_accuracy"] == 50
    assert s["f1"] == pytest.approx((200 / 3 + 100 + 0) / 3)
    assert "| f1 | 55.56 | 85.90 | 85.90 |" in (tmp_path / "out" / "scores.md").read_text()


def test_missing_answers_are_named_or_counted_wrong(tmp_path, capsys):
    data = layout_vqa.make_pope(tmp_path / "data")
    _pope_answers(tmp_path / "answers.jsonl", {k: v for k, v in POPE_ANSWERS.items() if k not in (2, 10000002)})
    code, _ = _score("pope", data, tmp_path / "answers.jsonl", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1 and "answers.jsonl: no answer for 2 of the 6 questions (question_id 2, 10000002)" in err
    code, scores = _score("pope", data, tmp_path / "answers.jsonl", tmp_path / "out", "--missing-as-wrong")
    # The two missing "no" questions count as answered "yes": adversarial yes/yes (F1 2/3 as before),
    # random yes/yes -> tp 1, fp 1: F1 2/3, accuracy 1/2.
    assert code == 0
    assert scores["scores"]["random_f1"] == pytest.approx(200 / 3) and scores["scores"]["random_accuracy"] == 50



def test_answers_without_a_question_are_counted_and_named(tmp_path, caplog):
    data = layout_vqa.make_pope(tmp_path / "data")
    _pope_answers(tmp_path / "answers.jsonl", {**POPE_ANSWERS, 77: "yes", 78: "no"})
    with caplog.at_level("WARNING"):
        code, scores = _score("pope", data, tmp_path / "answers.jsonl", tmp_path / "out")
    assert code == 0 and scores["scores"]["f1"] == pytest.approx((200 / 3 + 100 + 0) / 3)  # as without them
    assert "2 answer line(s) match no question of the task and are not scored (question_id 77, 78)" in caplog.text

def _reviews(path, pairs):
    """eval_gpt_review_bench.py's review lines: [(category, [reference score, answer score])]."""
    path.write_text("".join(json.dumps({"id": i + 1, "question_id": i, "answer1_id": f"ref{i}", "answer2_id": f"a{i}",
                                        "category": f"llava_bench_{c}", "content": f"{t[0]} {t[1]}\nBecause.",
                                        "tuple": t}) + "\n" for i, (c, t) in enumerate(pairs)))
    return path


def test_llava_bench_review_files_alone(tmp_path):
    one = _reviews(tmp_path / "llava-v1.5-13b-1.jsonl", [("conv", [8, 6]), ("detail", [10, 5]), ("complex", [6, 6])])
    two = _reviews(tmp_path / "llava-v1.5-13b-2.jsonl", [("conv", [8, 8]), ("detail", [10, 6]), ("complex", [6, 4])])
    out = tmp_path / "out"
    assert main(["--task", "llava_bench", "--reviews", str(one), str(two), "--output", str(out)]) == 0
    result = json.loads((out / "scores.json").read_text())
    # File 1: all = 5.667 / 8 -> 70.8; conv 75.0, detail 50.0, complex 100.0.
    # File 2: all = 6 / 8 -> 75.0; conv 100.0, detail 60.0, complex 66.7 (4 / 6).
    assert [r["scores"]["overall"] for r in result["reviews"]] == [70.8, 75.0]
    s = result["scores"]
    assert s["overall"] == pytest.approx(72.9) and s["conv"] == pytest.approx(87.5)
    assert s["detail"] == pytest.approx(55.0) and s["complex"] == pytest.approx(83.35)
    assert "| overall | 72.90 | 72.50 | 65.40 |" in (out / "scores.md").read_text()


def test_mmvet_grade_file_alone_and_with_capabilities(tmp_path):
    grades = {"v1_0": {"model": ["gpt-4-0613"] * 2, "content": ["1.0", "0.5"], "score": [1.0, 0.5]},
              "v1_1": {"model": ["gpt-4-0613"] * 2, "content": ["0.0", "0.0"], "score": [0.0, 0.0]},
              "v1_2": {"model": ["gpt-4-0613"] * 2, "content": ["0.5", "0.8"], "score": [0.5, 0.8]}}
    path = tmp_path / "llava-v1.5-13b_gpt-4-0613-grade-2runs.json"
    path.write_text(json.dumps(grades, indent=4))
    assert main(["--task", "mmvet", "--reviews", str(path), "--output", str(tmp_path / "a")]) == 0
    # Run 1: 1.5 / 3 = 50%; run 2: 1.3 / 3 = 43.33%; the mean of the runs.
    assert json.loads((tmp_path / "a" / "scores.json").read_text())["scores"] == {"total": pytest.approx(140 / 3)}
    data = layout_bench.make_mmvet(tmp_path / "data")  # mm-vet.json: v1_0 ocr+math, v1_1 rec, v1_2 rec+know
    assert main(["--task", "mmvet", "--reviews", str(path), "--data", str(data), "--output", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "scores.json").read_text())["scores"]
    assert s["total"] == pytest.approx(140 / 3)
    assert s["rec"] == pytest.approx((25 + 40) / 2) and s["ocr"] == pytest.approx(75) and s["know"] == pytest.approx(65)


def test_bad_command_lines_exit_2_with_the_reason(tmp_path, capsys):
    reviews = _reviews(tmp_path / "r.jsonl", [("conv", [8, 6])])
    cases = [
        (["--task", "pope", "--reviews", str(reviews)], "only llava_bench and mmvet are scored from judge output"),
        (["--task", "mmvet", "--reviews", str(reviews), "--judge-url", "http://x", "--judge-model", "m"],
         "--judge-url judges again"),
        (["--task", "pope", "--answers", str(reviews)], "--data is required"),
        (["--task", "pope", "--data", str(tmp_path), "--answers", str(tmp_path / "nope.jsonl")], "nope.jsonl: file not found"),
        (["--task", "pope", "--data", str(tmp_path), "--answers", str(reviews), "--model", str(tmp_path)], "not allowed with"),
        (["--task", "pope", "--data", str(tmp_path)], "one of the arguments --model --answers --reviews is required"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--output", str(tmp_path / "out")])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_bad_review_lines_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 0, "category": "llava_bench_conv", "tuple": [8]}) + "\n")
    assert main(["--task", "llava_bench", "--reviews", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "bad.jsonl:1: expected \"tuple\": [reference score, answer score], got [8]" in capsys.readouterr().err
    unfinished = tmp_path / "grades.json"
    unfinished.write_text(json.dumps({"v1_0": {"score": [1.0, 0.5]}, "v1_1": {"score": [0.0]}}))
    assert main(["--task", "mmvet", "--reviews", str(unfinished), "--output", str(tmp_path / "o")]) == 1
    assert "grades.json: samples graded a different number of times ([1, 2])" in capsys.readouterr().err
