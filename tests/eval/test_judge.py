"""The judge client and the judged scorings (LLaVA-Bench, MM-Vet) against a local fake OpenAI-compatible
server: requests as LLaVA's and MM-Vet's graders send them, the API key only ever in the Authorization
header (never in a file, a log line, an exception or a repr), retries, and clear errors."""

from __future__ import annotations

import http.server
import json
import logging
import threading

import pytest
from layout_bench import make_llava_bench, make_mmvet

from fastllava.eval.judge import LLAVA_BENCH_RULE, LLAVA_BENCH_SYSTEM, MMVET_PROMPT, Judge, JudgeError
from fastllava.eval.tasks.judged import LLaVABench, MMVet

KEY = "sk-test-secret-4242"


class FakeOpenAI:
    """A chat-completions endpoint on 127.0.0.1; `reply(body) -> (status, text)` decides each answer."""

    def __init__(self, reply):
        self.requests, self.reply = [], reply
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    status, text = 401, f"Incorrect API key provided: {self.headers.get('Authorization')}"
                else:
                    status, text = fake.reply(body)
                payload = ({"id": "x", "model": body["model"], "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": text}, "finish_reason": "stop"}]} if status == 200
                           else {"error": {"message": text}})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _no_key_anywhere(tmp_path, caplog):
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    assert KEY not in caplog.text


def test_chat_sends_key_only_in_header(fake):
    server = fake(lambda body: (200, "hello"))
    judge = Judge(server.url, "gpt-test", sleep=lambda s: None)
    assert judge.url == server.url + "/chat/completions"
    assert judge.chat([{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=3) == "hello"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
                               "temperature": 0.0, "max_tokens": 3}
    assert KEY not in repr(judge) and KEY not in str(vars(judge))


def test_openai_api_key_is_the_fallback(fake, monkeypatch):
    monkeypatch.delenv("FASTLLAVA_JUDGE_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = fake(lambda body: (200, "ok"))
    assert Judge(server.url + "/chat/completions", "m").chat([], temperature=0, max_tokens=1) == "ok"


def test_retries_transient_errors(fake, caplog):
    calls = []
    server = fake(lambda body: (503, "busy") if len(calls.append(1) or calls) < 3 else (200, "fine"))
    waits = []
    judge = Judge(server.url, "m", retries=4, backoff=0.5, sleep=waits.append)
    with caplog.at_level(logging.WARNING):
        assert judge.chat([{"role": "user", "content": "x"}], temperature=0, max_tokens=1) == "fine"
    assert waits == [0.5, 1.0] and len(server.requests) == 3
    assert "attempt 1 failed (HTTP 503" in caplog.text and server.url in caplog.text


def test_unauthorized_fails_at_once_without_leaking_the_key(fake, monkeypatch, caplog):
    server = fake(lambda body: (200, "never"))
    monkeypatch.setenv("FASTLLAVA_JUDGE_API_KEY", KEY + "-wrong")
    judge = Judge(server.url, "m", sleep=lambda s: None)
    with pytest.raises(JudgeError) as err:
        judge.chat([{"role": "user", "content": "x"}], temperature=0, max_tokens=1)
    message = str(err.value)
    assert "HTTP 401" in message and server.url + "/chat/completions" in message and "Incorrect API key" in message
    assert KEY not in message and len(server.requests) == 1  # the server echoed the key; it was scrubbed


def test_unreachable_names_the_url(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_JUDGE_API_KEY", KEY)
    judge = Judge("http://127.0.0.1:9/v1/", "m", retries=2, timeout=2, sleep=lambda s: None)
    with pytest.raises(JudgeError, match=r"judge at http://127\.0\.0\.1:9/v1/chat/completions \(model m\) failed after 3 attempts"):
        judge.chat([{"role": "user", "content": "x"}], temperature=0, max_tokens=1)


def test_llava_bench_judged(fake, tmp_path, caplog):
    def reply(body):
        question = body["messages"][1]["content"]
        return 200, ("8 9\nAssistant 2 is better." if "famous sight" in question
                     else "7,7\nEqual." if "Describe" in question else "Both are fine.")

    server = fake(reply)
    task = LLaVABench(judge=Judge(server.url, "gpt-4-0314", sleep=lambda s: None))
    qs = task.load(make_llava_bench(tmp_path / "data"))
    with caplog.at_level(logging.INFO):
        scores = task.score(qs, ["Diamond Head.", "A crater.", "Tourists buy them."], tmp_path / "out")
    # tuples [8, 9], [7, 7], [-1, -1]: all = 5.0 / 4.667; conv 9 / 8; detail 7 / 7; complex -1 / -1
    assert scores == {"overall": 107.1, "conv": 112.5, "detail": 100.0, "complex": 100.0,
                      "reference_score": 46.7, "model_score": 50.0}
    first = server.requests[0]["body"]
    assert first["temperature"] == 0.2 and first["max_tokens"] == 1024 and first["model"] == "gpt-4-0314"
    assert first["messages"][0] == {"role": "system", "content": LLAVA_BENCH_SYSTEM}
    assert first["messages"][1]["content"] == (
        "[Context]\nA volcanic crater next to a city by the ocean.\n\n"
        "[Question]\nWhat is the name of this famous sight in the photo?\n\n"
        "[Assistant 1]\nReference answer 0.\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\nDiamond Head.\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_BENCH_RULE}\n\n")
    assert server.requests[2]["body"]["messages"][1]["content"].startswith(
        "[Context]\nA market stall.\nYellow fruits are piled up.\n\n")  # a list caption, one sentence a line
    reviews = [json.loads(x) for x in (tmp_path / "out" / "reviews" / "llava_bench.jsonl").read_text().splitlines()]
    assert reviews[0] == {"id": 1, "question_id": 0, "answer1_id": "ref0", "answer2_id": None,
                          "category": "llava_bench_conv", "content": "8 9\nAssistant 2 is better.", "tuple": [8.0, 9.0]}
    _no_key_anywhere(tmp_path, caplog)


def test_llava_bench_judge_needs_references(fake, tmp_path):
    root = make_llava_bench(tmp_path)
    (root / "llava-bench-in-the-wild" / "answers_gpt4.jsonl").unlink()
    task = LLaVABench(judge=Judge("http://127.0.0.1:9/v1", "m"))
    with pytest.raises(Exception, match=r"answers_gpt4.jsonl: file not found"):
        task.load(root)


def test_mmvet_judged(fake, tmp_path, caplog):
    def reply(body):
        content = body["messages"][0]["content"]
        retry = content.endswith("Predict the correctness of the answer (digit): ")
        content = content[len(MMVET_PROMPT):]  # the few-shot table itself has "What is x in the equation?"
        if content.startswith("\nWhat is x in the equation? | -1 <AND> -5 | x = -1 | "):
            return 200, "0.5"
        if "What animal is shown?" in content:
            return 200, "1.0" if retry else "Correct"
        return 200, "high"  # "Is it a pet?": never a score

    server = fake(reply)
    task = MMVet(judge=Judge(server.url, "gpt-4-0613", sleep=lambda s: None))
    qs = task.load(make_mmvet(tmp_path / "data"))
    with caplog.at_level(logging.INFO):
        scores = task.score(qs, ["x = -1", "a cat", "yes"], tmp_path / "out")
    assert scores == pytest.approx({"total": 50.0, "ocr": 50.0, "math": 50.0, "rec": 50.0, "know": 0.0})
    bodies = [r["body"] for r in server.requests]
    assert bodies[0]["messages"][0]["content"] == MMVET_PROMPT + "\nWhat is x in the equation? | -1 <AND> -5 | x = -1 | "
    assert all(b["max_tokens"] == 3 for b in bodies) and len(bodies) == 1 + 2 + 5
    assert [b["temperature"] for b in bodies[3:]] == [0.0, 0.0, 0.5, 1.0, 1.5]
    grades = json.loads((tmp_path / "out" / "results" / "mmvet_gpt-4-0613-grade-1runs.json").read_text())
    assert grades["v1_1"] == {"model": ["gpt-4-0613"], "content": ["1.0"], "score": [1.0]}
    assert grades["v1_2"]["score"] == [0.0] and "no score in [0, 1] after 5 replies" in caplog.text
    csv_text = (tmp_path / "out" / "results" / "mmvet_gpt-4-0613-cap-score-1runs.csv").read_text()
    assert csv_text.splitlines()[0].split(",")[-3:] == ["total", "std", "runs"] and ",50.0," in csv_text
    _no_key_anywhere(tmp_path, caplog)


def test_mmvet_judge_needs_ground_truth(tmp_path):
    root = make_mmvet(tmp_path)
    (root / "mm-vet" / "mm-vet.json").unlink()
    with pytest.raises(Exception, match=r"mm-vet.json: file not found"):
        MMVet(judge=Judge("http://127.0.0.1:9/v1", "m")).load(root)


def test_command_line_judges_llava_bench(fake, llava_dir, tmp_path, caplog, capsys):
    from fastllava.eval.run import main

    server = fake(lambda body: (200, "6 4\nAssistant 1 is better."))
    data = make_llava_bench(tmp_path / "data")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["--model", str(llava_dir), "--task", "llava_bench", "--data", str(data), "--output", str(out),
                     "--max-new-tokens", "2", "--judge-url", server.url, "--judge-model", "gpt-4-0314"])
    assert code == 0
    assert len(server.requests) == 3  # one review per question
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert scores["overall"] == 66.7  # 4 / 6 for every question, as summarize_gpt_review.py rounds it
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err
    _no_key_anywhere(tmp_path, caplog)
