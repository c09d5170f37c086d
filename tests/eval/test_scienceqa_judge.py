"""ScienceQA's "GPT-4 as the judge" ensemble (LLaVA's eval_science_qa_gpt4_requery.py) against a local fake
OpenAI-compatible server on a loopback socket: who is asked (only where the model and the language-only
answers disagree), with what message, how the replies combine, hand-worked scores, files, the key never
written, and the CLI options."""

from __future__ import annotations

import json
import logging

import pytest
from layout_vqa import make_scienceqa
from test_judge import KEY

from fastllava.eval import run as eval_run
from fastllava.eval.judge import Judge
from fastllava.eval.scorers import scienceqa_ensemble
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.scienceqa import JUDGE_INSTRUCTION, JUDGE_SYSTEM, ScienceQA

# layout_vqa's test problems 4 (B), 5 (B), 11 (D), 15 (A). The model: 4 "B" right, 5 right, 11 "D." unparsed
# (wrong), 15 "A. ..." right.
MODEL = ["B", "The answer is B.", "D.", "A. 7 kilograms"]
# The language-only model: 4 A (wrong, disagrees), 5 B (agrees: no query), 11 D (disagrees with an unparsed
# answer), 15 B (wrong, disagrees).
LANGUAGE = {"4": "The answer is A.", "5": "The answer is B. It is steady.", "11": "The answer is D.",
            "15": "The answer is B."}


def _reply(body):
    text = body["messages"][1]["content"]
    if "figure of speech" in text:
        return 200, "Assistant 1 is right: the text speaks to a goddess. The answer is B."
    if "snow" in text:
        return 200, "Lynx have wide furry feet. The answer is D."
    return 200, "I cannot decide."  # problem 15: no option named, the model's answer stays


def _language_file(tmp_path, answers=LANGUAGE):
    path = tmp_path / "gpt4_text_only.json"
    path.write_text(json.dumps({"acc": 0, "outputs": answers}))
    return path


def test_ensemble_rule():
    assert scienceqa_ensemble(2, 2, None) == 2  # agreement: no query
    assert scienceqa_ensemble(2, 0, 0) == 0  # the judge sides with the language-only model
    assert scienceqa_ensemble(2, 0, 1) == 1  # or picks a third option
    assert scienceqa_ensemble(2, 0, -1) == 2  # a reply naming no option keeps the model's
    assert scienceqa_ensemble(-1, 3, -1) == -1


def test_judged_scores_requests_and_files(fake, tmp_path, caplog):
    server = fake(_reply)
    data = make_scienceqa(tmp_path / "data")
    task = ScienceQA(breakdown=True, judge=Judge(server.url, "gpt-4-0314", sleep=lambda s: None),
                     language_only=_language_file(tmp_path))
    qs = task.load(data)
    with caplog.at_level(logging.INFO):
        scores = task.score(qs, MODEL, tmp_path / "out")
    # Judged: 4 -> B (right), 5 agreed B (right), 11 -> D (right), 15 no option -> model's A (right): 4/4.
    # Language-only alone: 5 and 11 right: 2/4.
    assert scores["accuracy"] == 75.0 and scores["judged_accuracy"] == 100.0
    assert scores["language_only_accuracy"] == 50.0
    # layout_vqa's problems are all NAT grade5; 4, 5, 11 have a hint (TXT), 5 and 11 an image, 15 neither (NO).
    assert {k: v for k, v in scores.items() if k.startswith("judged_")} == {
        "judged_accuracy": 100.0, "judged_NAT": 100.0, "judged_TXT": 100.0, "judged_IMG": 100.0, "judged_NO": 100.0,
        "judged_G1-6": 100.0}
    assert len(server.requests) == 3  # 4, 11, 15; never 5
    first = server.requests[0]["body"]
    assert first["model"] == "gpt-4-0314" and first["temperature"] == 0.0 and first["max_tokens"] == 1024
    assert first["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert first["messages"][1]["content"] == (
        "Context: Sing, O goddess, the anger of Achilles son of Peleus.\n\u2014Homer, The Iliad\n"
        "Question: Which figure of speech is used in this text?\nOptions: (A) chiasmus (B) apostrophe\n\n"
        "Two assistants answered this question. Assistant 1 saw the image of the question, if it has one; "
        "Assistant 2 read only the text.\n\n[Assistant 1]\nB\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\nThe answer is A.\n[End of Assistant 2]\n\n{JUDGE_INSTRUCTION}")
    assert "[Assistant 1]\nD.\n" in server.requests[1]["body"]["messages"][1]["content"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "scienceqa_judge.jsonl").read_text().splitlines()]
    assert [(x["question_id"], x["judge_choice"], x["final_choice"]) for x in lines] == [
        ("4", 1, 1), ("11", 3, 3), ("15", -1, 0)]
    result = json.loads((tmp_path / "out" / "scienceqa_judged_result.json").read_text())
    assert result == {"acc": 100.0, "correct": 4, "count": 4, "results": {"4": 1, "5": 1, "11": 3, "15": 0}}
    assert "asked on 3 of 4 problems (1 replies named no option" in caplog.text
    for path in (tmp_path / "out").iterdir():
        assert KEY not in path.read_text()
    assert KEY not in caplog.text


def test_language_only_answers_jsonl(fake, tmp_path):
    server = fake(_reply)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in LANGUAGE.items()))
    task = ScienceQA(judge=Judge(server.url, "m", sleep=lambda s: None), language_only=path)
    qs = task.load(make_scienceqa(tmp_path / "data"))
    assert task.score(qs, MODEL, tmp_path / "out")["judged_accuracy"] == 100.0


def test_language_only_file_errors(tmp_path):
    data = make_scienceqa(tmp_path / "data")
    judge = Judge("http://127.0.0.1:9/v1", "m")
    missing = {k: v for k, v in LANGUAGE.items() if k != "11"}
    with pytest.raises(EvalDataError, match=r"gpt4_text_only.json: no answer for 1 of the 4 test problems \(e.g. 11\)"):
        ScienceQA(judge=judge, language_only=_language_file(tmp_path, missing)).load(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"4": "A"}))
    with pytest.raises(EvalDataError, match=r'bad.json: expected \{"outputs"'):
        ScienceQA(judge=judge, language_only=bad).load(data)
    with pytest.raises(ValueError, match="needs both a judge and a language-only answers file"):
        ScienceQA(judge=judge)


def test_cli_options(tmp_path, capsys):
    data = make_scienceqa(tmp_path / "data")
    language = _language_file(tmp_path)
    base = ["--model", "m", "--data", str(data), "--output", str(tmp_path / "o")]
    args = eval_run.parse_args(base + ["--task", "scienceqa", "--sqa-language-only", str(language),
                                       "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "gpt-4"])
    task = eval_run.task_for(args)
    assert isinstance(task, ScienceQA) and task.breakdown and task.judge.model == "gpt-4"
    assert task.language_only == language and task.question_format == "CQM-A"
    assert eval_run.task_for(eval_run.parse_args(base + ["--task", "scienceqa", "--sqa-format", "QCM-LEA"])
                               ).question_format == "QCM-LEA"
    for extra, message in [
        (["--task", "scienceqa", "--sqa-language-only", str(language)], "--sqa-language-only and --judge-url"),
        (["--task", "scienceqa", "--judge-url", "http://x", "--judge-model", "g"], "--sqa-language-only and --judge-url"),
        (["--task", "pope", "--sqa-format", "QCM-LEA"], "are options of --task scienceqa"),
        (["--task", "scienceqa", "--sqa-format", "QCM-Z"], "--sqa-format: prompt format 'QCM-Z'"),
        (["--task", "scienceqa", "--sqa-language-only", str(tmp_path / "none.json"), "--judge-url", "http://x",
          "--judge-model", "g"], "none.json: file not found"),
    ]:
        with pytest.raises(SystemExit) as e:
            eval_run.parse_args(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
