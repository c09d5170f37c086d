"""MME, MMBench(-CN), SEED-Bench, LLaVA-Bench and MM-Vet tasks: load() from LLaVA's layout (tests/eval/
layout_bench.py), score() on hand-chosen answers, and EvalDataError (file, line, what was expected) on bad input."""

from __future__ import annotations

import csv
import json

import pytest
from layout_bench import make_llava_bench, make_mmbench, make_mmbench_cn, make_mme, make_mmvet, make_seed

from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.judged import LLaVABench, MMVet
from fastllava.eval.tasks.mmbench import MMBench, MMBenchCN
from fastllava.eval.tasks.mme import MME
from fastllava.eval.tasks.seed import SEED

MC = "Answer with the option's letter from the given choices directly."


def test_task_attributes():
    assert (MME.max_new_tokens, SEED.max_new_tokens) == (128, 128)  # model_vqa_loader.py's default
    assert MMBench.max_new_tokens == MMBenchCN.max_new_tokens == LLaVABench.max_new_tokens == MMVet.max_new_tokens == 1024
    assert MME.published["llava-v1.5-7b"] == {"perception": 1510.7}
    assert MMBenchCN.published["llava-v1.5-13b"] == {"circular_accuracy": 63.6}
    assert [c.name for c in (MME, MMBench, MMBenchCN, SEED, LLaVABench, MMVet)] == [
        "mme", "mmbench", "mmbench_cn", "seed", "llava_bench", "mmvet"]


# ------------------------------------------------------------------------------------------------ MME

def test_mme_load(tmp_path):
    qs = MME().load(make_mme(tmp_path))
    assert len(qs) == 8 and len({q.question_id for q in qs}) == 8
    assert qs[0].question_id == "existence/000000000001.jpg" and qs[1].question_id == "existence/000000000001.jpg#2"
    assert qs[1].record == {"question_id": "existence/000000000001.jpg"}  # LLaVA's id in the answers file
    assert qs[0].text == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    assert qs[4].images[0].name == "10002.jpg" and qs[4].truth["category"] == "artwork"
    # the second code_reasoning question's ground truth has two spaces before "Please answer yes or no."
    assert qs[7].truth["question"] == "Is a c++ code shown in the picture?  Please answer yes or no."
    assert [q.truth["answer"] for q in qs] == ["Yes", "No", "No", "Yes", "Yes", "No", "Yes", "No"]


def test_mme_score(tmp_path):
    task = MME()
    qs = task.load(make_mme(tmp_path / "data"))
    answers = ["Yes", "No",            # existence image 1: both right
               "Yes", "Yes",           # existence image 2: one right -> existence 75 + 50
               "No, it is not.", "No",  # artwork: one right, acc+ 0 -> 50
               "Yes", "no"]            # code_reasoning: 200
    scores = task.score(qs, answers, tmp_path / "out")
    assert scores == {"perception": 175.0, "cognition": 200.0, "existence": 125.0, "artwork": 50.0, "code_reasoning": 200.0}
    lines = (tmp_path / "out" / "mme_results" / "artwork.txt").read_text().splitlines()
    assert lines[0] == "10002.txt\tIs this artwork created by vinci, leonardo da? Please answer yes or no.\tYes\tNo, it is not."


def _rewrite_jsonl(path, change):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in change(rows)))


def test_mme_bad_input(tmp_path):
    root = make_mme(tmp_path)
    qfile = root / "MME" / "llava_mme.jsonl"
    (root / "MME" / "MME_Benchmark_release_version" / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"llava_mme.jsonl:5: image 'artwork/images/10002.jpg' not found"):
        MME().load(root)
    make_mme(root)
    _rewrite_jsonl(qfile, lambda rows: rows + [rows[0]])
    with pytest.raises(EvalDataError, match=r"llava_mme.jsonl:9: question .* repeats line 1"):
        MME().load(root)
    make_mme(root)
    _rewrite_jsonl(qfile, lambda rows: [{**rows[0], "text": "Is it raining?"}] + rows[1:])
    expected = r"llava_mme.jsonl:1: no ground truth for 'Is it raining\?  Please answer yes or no.' in .*000000000001.txt"
    with pytest.raises(EvalDataError, match=expected):
        MME().load(root)
    make_mme(root)
    qfile.write_text(qfile.read_text() + "{not json\n")
    with pytest.raises(EvalDataError, match=r"llava_mme.jsonl:9: expected a JSON object"):
        MME().load(root)
    with pytest.raises(EvalDataError, match=r"llava_mme.jsonl: file not found"):
        MME().load(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------- MMBench

def test_mmbench_load(tmp_path):
    qs = MMBench().load(make_mmbench(tmp_path))
    assert [q.question_id for q in qs] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    assert qs[0].text == f"What color is the square?\nA. red\nB. green\nC. blue\nD. yellow\n{MC}"
    assert qs[1].record["prompt"] == "What color is the square?\nA. green\nB. blue\nC. yellow\nD. red"
    assert qs[4].text == f"Look at the picture.\nThen answer.\nIs the picture dark?\nA. yes\nB. no\n{MC}"
    assert qs[4].record == {"question_id": 1, "round_id": 0, "prompt": qs[4].text[: -len(MC) - 1],
                            "options": ["yes", "no"], "option_char": ["A", "B"]}
    assert qs[0].images[0].open().size == (6, 6)  # kept encoded, decoded when its prompt is built
    assert [q.truth["answer"] for q in qs] == ["A", "D", "C", "B", "B", "A"]


def test_mmbench_score_and_submission(tmp_path):
    task = MMBench()
    qs = task.load(make_mmbench(tmp_path / "data"))
    # question 0 right in every rotation (by letter or by option text); question 1 wrong in its second
    assert task.score(qs, ["A", "D. red", "red", "B", "B", "B"], tmp_path / "out") == {"circular_accuracy": 50.0}
    with open(tmp_path / "out" / "answers_upload" / "mmbench_dev_20230712.tsv", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[2] == ["1000000", "What color is the square?", "green", "blue", "yellow", "red", "D. red", "D", "dev"]
    assert table[5][:7] == ["1", "Is the picture dark?", "yes", "no", "", "", "B"] and len(table) == 7


def test_mmbench_all_rounds(tmp_path):
    qs = MMBench(all_rounds=True).load(make_mmbench(tmp_path))
    assert len(qs) == 4 * 4 + 2 * 2 and len({q.question_id for q in qs}) == 20
    second = qs[1]  # row index 0, round 1: options rotated by one, letters shown stay A-D
    assert second.question_id == "0/1" and second.record["question_id"] == 0 and second.record["round_id"] == 1
    assert second.record["prompt"].endswith("A. green\nB. blue\nC. yellow\nD. red")
    assert second.record["option_char"] == ["B", "C", "D", "A"] and second.truth["answer"] == "D"
    answers = [q.truth["answer"] for q in qs]
    assert MMBench(all_rounds=True).score(qs, answers, tmp_path / "out") == {"circular_accuracy": 100.0}


def test_mmbench_cn(tmp_path):
    task = MMBenchCN()
    qs = task.load(make_mmbench_cn(tmp_path))
    assert qs[0].text == "请仔细看图。\n图中方块是什么颜色？\nA. 红色\nB. 绿色\nC. 蓝色\n请直接回答选项字母。"
    assert task.score(qs, ["C", "B", "A"], tmp_path / "out") == {"circular_accuracy": 100.0}
    assert task.score(qs, ["C", "B", "蓝色 C"], tmp_path / "out") == {"circular_accuracy": 0.0}


def test_mmbench_test_split_writes_submission_only(tmp_path):
    root = make_mmbench(tmp_path / "data")
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    with open(path, newline="") as f:
        rows = [r[:7] + r[8:] for r in csv.reader(f, delimiter="\t")]  # drop the answer column
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)
    task = MMBench()
    qs = task.load(root)
    assert task.score(qs, ["A"] * len(qs), tmp_path / "out") == {}
    assert (tmp_path / "out" / "answers_upload" / "mmbench_dev_20230712.tsv").is_file()


def _edit_tsv(path, change):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(change(rows))


def test_mmbench_bad_input(tmp_path):
    root = make_mmbench(tmp_path)
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    # rows are one line each, except question 1's (hint of two lines): header is line 1, rows 2-5, 6-7, 8-9
    _edit_tsv(path, lambda rows: rows[:3] + [rows[3][:5]] + rows[4:])
    with pytest.raises(EvalDataError, match=r"mmbench_dev_20230712.tsv:4: expected 14 TAB-separated cells, found 5"):
        MMBench().load(root)
    make_mmbench(root)
    _edit_tsv(path, lambda rows: rows[:6] + [[*rows[6][:9], "bm90IGFuIGltYWdl", *rows[6][10:]]])
    with pytest.raises(EvalDataError, match=r"tsv:8: column image: expected a base64-encoded image"):
        MMBench().load(root)
    make_mmbench(root)
    _edit_tsv(path, lambda rows: rows[:2] + [["zero", *rows[2][1:]]] + rows[3:])
    with pytest.raises(EvalDataError, match=r"tsv:3: column index: expected an integer, got 'zero'"):
        MMBench().load(root)
    make_mmbench(root)
    _edit_tsv(path, lambda rows: rows + [rows[1]])
    with pytest.raises(EvalDataError, match=r"tsv:10: index 0 repeats line 2"):
        MMBench().load(root)
    with pytest.raises(EvalDataError, match=r"mmbench_dev_cn_20231003.tsv: file not found"):
        MMBenchCN().load(root)


# ----------------------------------------------------------------------------------------------- SEED

def test_seed_load_and_score(tmp_path):
    task = SEED()
    qs = task.load(make_seed(tmp_path / "data"))
    assert [q.question_id for q in qs] == ["101669", "101670", "v2001"]
    assert qs[0].text == f"How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n{MC}"
    assert qs[2].images[0].as_posix().endswith("seed_bench/SEED-Bench-video-image/10_v2001.png")
    scores = task.score(qs, ["B", "A", "D"], tmp_path / "out")
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["image_accuracy"] == 50.0
    assert scores["video_accuracy"] == 100.0 and scores["Scene Understanding"] == 0.0
    upload = [json.loads(x) for x in (tmp_path / "out" / "answers_upload" / "seed.jsonl").read_text().splitlines()]
    assert upload[0] == {"question_id": "101669", "prediction": "B"}


def test_seed_unasked_questions_count_wrong(tmp_path, caplog):
    root = make_seed(tmp_path / "data")
    _rewrite_jsonl(root / "seed_bench" / "llava-seed-bench.jsonl", lambda rows: rows[:2])
    task = SEED()
    qs = task.load(root)
    scores = task.score(qs, ["B", "C"], tmp_path / "out")
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["video_accuracy"] == 0.0
    assert "1 of 3 questions have no answer" in caplog.text


def test_seed_bad_input(tmp_path):
    root = make_seed(tmp_path)
    qfile = root / "seed_bench" / "llava-seed-bench.jsonl"
    _rewrite_jsonl(qfile, lambda rows: rows + [{**rows[0], "question_id": "999"}])
    with pytest.raises(EvalDataError, match=r"llava-seed-bench.jsonl:4: question_id '999' is not in SEED-Bench.json"):
        SEED().load(root)
    make_seed(root)
    _rewrite_jsonl(qfile, lambda rows: rows + [rows[1]])
    with pytest.raises(EvalDataError, match=r"llava-seed-bench.jsonl:4: question_id '101670' repeats line 2"):
        SEED().load(root)
    make_seed(root)
    (root / "seed_bench" / "SEED-Bench-video-image" / "10_v2001.png").unlink()
    with pytest.raises(EvalDataError, match=r"llava-seed-bench.jsonl:3: image 'SEED-Bench-video-image/10_v2001.png' not found"):
        SEED().load(root)
    (root / "seed_bench" / "SEED-Bench.json").write_text("[]")
    with pytest.raises(EvalDataError, match=r"SEED-Bench.json: expected SEED-Bench's annotation"):
        SEED().load(root)


# ------------------------------------------------------------------------------ LLaVA-Bench and MM-Vet

def test_llava_bench_without_judge(tmp_path):
    task = LLaVABench(judge=None)
    qs = task.load(make_llava_bench(tmp_path / "data"))
    assert [(q.question_id, q.text) for q in qs][0] == (0, "What is the name of this famous sight in the photo?")
    assert qs[2].images[0].name == "002.jpg" and qs[1].truth["category"] == "detail"
    assert task.score(qs, ["a", "b", "c"], tmp_path / "out") == {}


def test_llava_bench_bad_input(tmp_path):
    root = make_llava_bench(tmp_path)
    qfile = root / "llava-bench-in-the-wild" / "questions.jsonl"
    _rewrite_jsonl(qfile, lambda rows: rows + [{**rows[0], "image": "003.jpg", "question_id": 7}])
    with pytest.raises(EvalDataError, match=r"questions.jsonl:4: image '003.jpg' not found"):
        LLaVABench().load(root)
    make_llava_bench(root)
    _rewrite_jsonl(qfile, lambda rows: rows + [{**rows[1]}])
    with pytest.raises(EvalDataError, match=r"questions.jsonl:4: question_id 1 repeats line 2"):
        LLaVABench().load(root)


def test_mmvet_without_judge_writes_results(tmp_path):
    task = MMVet(judge=None)
    qs = task.load(make_mmvet(tmp_path / "data"))
    assert [q.question_id for q in qs] == [0, 1, 2] and qs[2].images[0].name == "v1_1.png"
    assert task.score(qs, ["x = -1", "a cat", "yes"], tmp_path / "out") == {}
    results = json.loads((tmp_path / "out" / "results" / "mmvet.json").read_text())
    assert results == {"v1_0": "x = -1", "v1_1": "a cat", "v1_2": "yes"}  # convert_mmvet_for_eval.py's format


def test_mmvet_bad_input(tmp_path):
    root = make_mmvet(tmp_path)
    qfile = root / "mm-vet" / "llava-mm-vet.jsonl"
    _rewrite_jsonl(qfile, lambda rows: rows + [{"image": "v1_0.png", "question_id": 3}])
    with pytest.raises(EvalDataError, match=r"llava-mm-vet.jsonl:4: expected keys question_id, image, text; missing text"):
        MMVet().load(root)


# ------------------------------------------------------------------------------------------- ScienceQA table


def _sqa_layout(tmp_path):
    """layout_vqa's four test problems, given the subjects and grades of the paper's table: "4" LAN grade9
    (hint, no image: TXT), "5" NAT grade5 (hint + image: TXT and IMG), "11" NAT grade5 (TXT and IMG), "15" SOC
    grade12 (no hint, no image: NO)."""
    from layout_vqa import make_scienceqa

    data = make_scienceqa(tmp_path)
    path = data / "scienceqa" / "problems.json"
    problems = json.loads(path.read_text())
    problems["4"].update(subject="language science", grade="grade9")
    problems["15"].update(subject="social science", grade="grade12")
    path.write_text(json.dumps(problems))
    return data


def test_scienceqa_subsets():
    from fastllava.eval.scorers import scienceqa_subsets

    assert scienceqa_subsets({"subject": "natural science", "hint": "x", "image": "image.png", "grade": "grade6"}) == [
        "NAT", "TXT", "IMG", "G1-6"]
    assert scienceqa_subsets({"subject": "social science", "hint": "", "image": None, "grade": "grade7"}) == [
        "SOC", "NO", "G7-12"]
    assert scienceqa_subsets({"subject": "language science", "hint": "", "image": "a.png", "grade": "grade12"}) == [
        "LAN", "IMG", "G7-12"]


def test_scienceqa_breakdown(tmp_path):
    from fastllava.eval.tasks.scienceqa import ScienceQA

    task = ScienceQA(breakdown=True)
    qs = task.load(_sqa_layout(tmp_path))
    # Right: 4 (B), 5 (sentence rule), 15 ("A. ..."); wrong: 11 ("D." does not parse).
    scores = task.score(qs, ["B", "The answer is B.", "D.", "A. 7 kilograms"], tmp_path / "out")
    # NAT {5 ok, 11 x} 50; SOC {15 ok}; LAN {4 ok}; TXT {4, 5 ok, 11 x} 2/3; IMG {5 ok, 11 x}; NO {15 ok};
    # G1-6 {5 ok, 11 x}; G7-12 {4, 15 ok}.
    assert scores == pytest.approx({"accuracy": 75.0, "img_accuracy": 50.0, "NAT": 50.0, "SOC": 100.0, "LAN": 100.0,
                                    "TXT": 200 / 3, "IMG": 50.0, "NO": 100.0, "G1-6": 50.0, "G7-12": 100.0})
    assert list(scores) == ["accuracy", "img_accuracy", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]


def test_scienceqa_breakdown_counts_unanswered_wrong(tmp_path):
    from fastllava.eval.tasks.scienceqa import ScienceQA

    task = ScienceQA(breakdown=True)
    qs = task.load(_sqa_layout(tmp_path))
    # Only 4 and 5 answered (right); 11 and 15 FAILED. The problems' own image field decides IMG (11 counts),
    # while LLaVA's img_accuracy reads the prompt ("Unknown" for 11): 1/1.
    scores = task.score(qs[:2], ["B", "B"], tmp_path / "out")
    assert scores == pytest.approx({"accuracy": 50.0, "img_accuracy": 100.0, "NAT": 50.0, "SOC": 0.0, "LAN": 100.0,
                                    "TXT": 200 / 3, "IMG": 50.0, "NO": 0.0, "G1-6": 50.0, "G7-12": 50.0})


def test_scienceqa_breakdown_needs_subject_and_grade(tmp_path):
    from fastllava.eval.tasks.scienceqa import ScienceQA

    data = _sqa_layout(tmp_path)
    path = data / "scienceqa" / "problems.json"
    problems = json.loads(path.read_text())
    del problems["11"]["grade"]
    path.write_text(json.dumps(problems))
    with pytest.raises(EvalDataError, match=r"problem '11': the per-class table needs subject and grade"):
        ScienceQA(breakdown=True).load(data)
    assert len(ScienceQA().load(data)) == 4  # without the table, as before


def test_scienceqa_paper_question_format(tmp_path):
    from fastllava.eval.tasks.scienceqa import ScienceQA

    data = _sqa_layout(tmp_path)
    entries = json.loads((data / "scienceqa" / "llava_test_CQM-A.json").read_text())
    (data / "scienceqa" / "llava_test_QCM-LEA.json").write_text(json.dumps(entries))
    cqm, paper = ScienceQA().load(data), ScienceQA(question_format="QCM-LEA").load(data)
    # The paper's protocol asks the question file as written, without the single-letter instruction.
    assert [q.text for q in paper] == [q.text.rsplit("\n", 1)[0] for q in cqm]
    assert paper[1].record["prompt"] == "<image>\n" + paper[1].text
    with pytest.raises(ValueError, match="prompt format 'QCM'"):
        ScienceQA(question_format="QCM")
    with pytest.raises(EvalDataError, match="llava_test_QCM-A.json: file not found"):
        ScienceQA(question_format="QCM-A").load(data)
