"""fastllava.datagen end to end against a scripted OpenAI-compatible server on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastllava.data.files import RejectLog, load_records
from fastllava.datagen.__main__ import main
from fastllava.datagen.run import DatagenConfig, run

KEY = "sk-test-SECRET-4f9a1c"
GOOD = "Question:\nWhat is on the sofa?\n===\nAnswer:\nA cat.\n===\nQuestion:\nIs it asleep?\n===\nAnswer:\nYes."


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_DATAGEN_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("FASTLLAVA_PROGRESS_INTERVAL", "0")  # a progress line per image, to check them


def argv(endpoint, annotations, out, *extra):
    return ["--annotations", str(annotations), "--kind", "conversation", "--endpoint", endpoint.url,
            "--model", "fake-model", "--out", str(out), "--backoff", "0.01", "--timeout", "5", *extra]


def lines(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def assert_no_key(capsys, *paths):
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, *(Path(p).read_text() for p in paths if os.path.exists(p))):
        assert KEY not in text
    return captured


def test_retries_429_500_and_timeouts_then_writes_valid_llava_data(endpoint, tmp_path, write_coco, capsys):
    write_coco(tmp_path, 3)
    endpoint.script = {
        "cat 0 resting": [("delay", 1.5, GOOD), ("ok", GOOD)],
        "cat 1 resting": [("status", 429, "slow down", {"Retry-After": "0.3"}), ("ok", GOOD)],
        # a server that echoes the Authorization header in its error body
        "cat 2 resting": [("status", 500, "internal error for {auth}", {}), ("status", 503, "{auth}", {}), ("ok", GOOD)],
    }
    out = tmp_path / "out" / "conv.jsonl"
    assert main(argv(endpoint, tmp_path, out, "--timeout", "0.5", "--concurrency", "3")) == 0
    captured = assert_no_key(capsys, out)
    assert "datagen: 3 written, 0 rejected, 0 failed" in captured.err
    assert "req 7" in captured.err and "fail 0" in captured.err  # progress line: 2 + 2 + 3 requests

    assert all(h["authorization"] == f"Bearer {KEY}" for _, h, _ in endpoint.requests)
    assert all(b["model"] == "fake-model" for _, _, b in endpoint.requests)
    times = [t for t, _, b in endpoint.requests if "cat 1 resting" in b["messages"][-1]["content"]]
    assert times[1] - times[0] >= 0.3  # Retry-After honored over the 0.01 s backoff

    records = load_records([str(out)], rejects=RejectLog(strict=True), verbose=False)
    assert sorted(records.ids) == ["100", "101", "102"]
    first = records[0]
    assert first["image"].endswith(".jpg") and first["conversations"][0]["value"] == "<image>\nWhat is on the sofa?"
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt", "human", "gpt"]


def test_prompt_messages_sent(endpoint, tmp_path, write_coco, capsys):
    write_coco(tmp_path, 1)
    assert main(argv(endpoint, tmp_path, tmp_path / "o.jsonl")) == 0
    (_, _, body), = endpoint.requests
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "cat 0 resting\nA cat 0 on a sofa.\n\ncat: [0.1, 0.1, 0.6, 0.6]"


def test_malformed_answers_are_rejected_with_reasons(endpoint, tmp_path, write_coco, capsys):
    write_coco(tmp_path, 4)
    endpoint.script = {
        "cat 0 resting": [("ok", "")],
        "cat 1 resting": [("ok", "Question:\nWhere is the cat?\n===\nAnswer:\nAt [0.1, 0.1, 0.6, 0.6].")],
        "cat 2 resting": [("ok", "Just a cat, no questions.")],
    }
    out = tmp_path / "conv.jsonl"
    assert main(argv(endpoint, tmp_path, out)) == 0
    captured = assert_no_key(capsys)
    assert "1 written, 3 rejected (1 coordinates, 1 empty, 1 format)" in captured.err
    rejects = {r["id"]: r for r in lines(tmp_path / "conv.rejects.jsonl")}
    assert {i: r["reason"] for i, r in rejects.items()} == {"100": "empty", "101": "coordinates", "102": "format"}
    assert rejects["101"]["answer"].startswith("Question:")
    assert [r["id"] for r in lines(out)] == ["103"]


@pytest.mark.parametrize("code", [401, 500])
def test_every_request_failing_exits_nonzero_without_leaking_the_key(endpoint, tmp_path, write_coco, capsys, code):
    write_coco(tmp_path, 2)
    endpoint.script = {"cat": [("status", code, "bad key {auth}", {})]}
    out = tmp_path / "conv.jsonl"
    assert main(argv(endpoint, tmp_path, out, "--max-retries", "2")) == 1
    captured = assert_no_key(capsys, out, tmp_path / "conv.rejects.jsonl")
    assert "0 written, 0 rejected, 2 failed" in captured.err
    assert f"HTTP {code}" in captured.err and "Bearer ***" in captured.err
    assert len(endpoint.requests) == 2 * (1 if code == 401 else 3)  # a 401 is not retried
    assert lines(out) == []


def test_resumed_run_writes_every_image_exactly_once(endpoint, tmp_path, write_coco, capsys):
    write_coco(tmp_path, 6)
    endpoint.script = {"cat 4 resting": [("ok", "no format")]}  # a reject, also never asked twice
    out = tmp_path / "conv.jsonl"
    assert main(argv(endpoint, tmp_path, out, "--limit", "2")) == 0
    assert len(lines(out)) == 2
    with open(out, "a") as f:  # killed while writing a record
        f.write('{"id": "999", "image": "x.jp')

    class Crash(Exception):
        pass

    calls = []

    class CrashingClient:  # the process dies on its third request of the second run
        def __init__(self, real):
            self.real = real

        def chat(self, messages):
            calls.append(1)
            if len(calls) == 3:
                raise Crash()
            return self.real.chat(messages)

    from fastllava.datagen.client import ChatClient
    cfg = DatagenConfig([str(tmp_path)], "conversation", endpoint.url, "m", str(out), concurrency=1, backoff=0.01)
    with pytest.raises(Crash):
        run(cfg, client=CrashingClient(ChatClient(endpoint.url, "m")))
    assert main(argv(endpoint, tmp_path, out)) == 0
    assert_no_key(capsys, out)

    written = [r["id"] for r in lines(out)]
    rejected = [r["id"] for r in lines(tmp_path / "conv.rejects.jsonl")]
    assert sorted(written + rejected) == ["100", "101", "102", "103", "104", "105"]  # each once, 999 gone
    assert rejected == ["104"]
    asked = [b["messages"][-1]["content"].split(" resting")[0] for _, _, b in endpoint.requests]
    assert sorted(asked) == [f"cat {i}" for i in range(6)]  # no image asked for twice
    load_records([str(out)], rejects=RejectLog(strict=True), verbose=False)
    # a third run has nothing to do
    assert main(argv(endpoint, tmp_path, out)) == 0
    assert "6 already done of 6 images" in capsys.readouterr().err


def test_jsonl_input_detail_kind(endpoint, tmp_path, capsys):
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps({"image": f"img{i}.jpg", "captions": [f"picture {i}"],
                                       "boxes": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}) + "\n"
                           for i in range(3)))
    endpoint.script = {"picture": [("ok", "A dog is sitting on the grass in the sun.")]}
    out = tmp_path / "detail.jsonl"
    assert main(["--annotations", str(ann), "--kind", "detail", "--endpoint", endpoint.url + "/chat/completions",
                 "--model", "m", "--out", str(out), "--image-prefix", "demo/"]) == 0
    records = load_records([str(out)], rejects=RejectLog(strict=True), verbose=False)
    assert len(records) == 3
    r = records[0]
    assert r["image"].startswith("demo/img") and r["conversations"][1]["value"] == "A dog is sitting on the grass in the sun."
    assert r["conversations"][0]["value"].startswith("<image>\n")
    assert "3 brief descriptions written" in capsys.readouterr().err
    brief = load_records([str(tmp_path / "detail.brief.jsonl")], rejects=RejectLog(strict=True), verbose=False)
    assert sorted(brief.ids) == sorted(records.ids)
    for b in brief:
        assert b["conversations"][1]["value"] == f"picture {b['image'][len('demo/img'):-len('.jpg')]}"


def test_detail_brief_samples_resume_and_images_without_captions_are_listed(endpoint, tmp_path, write_coco, capsys):
    write_coco(tmp_path, 4)
    data = json.loads((tmp_path / "instances_tiny.json").read_text())
    data["images"].append({"id": 7, "file_name": "7.jpg", "width": 10, "height": 10})  # boxes only, no captions
    (tmp_path / "instances_tiny.json").write_text(json.dumps(data))
    endpoint.script = {"cat": [("ok", "An orange cat sleeps on a sofa.")]}
    out = tmp_path / "detail.jsonl"
    detail = argv(endpoint, tmp_path, out)
    detail[detail.index("--kind") + 1] = "detail"
    assert main(detail + ["--limit", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 written" in err and "4 brief descriptions written" in err  # brief samples need no request
    assert "skipped 1 image(s) without captions (ids 7)" in err
    first = lines(tmp_path / "detail.brief.jsonl")
    with open(tmp_path / "detail.brief.jsonl", "a") as f:  # killed while writing the brief file
        f.write('{"id": "10')
    assert main(detail) == 0
    err = capsys.readouterr().err
    assert "3 written" in err and "brief descriptions" not in err and "2 already done of 5 images" in err
    brief = lines(tmp_path / "detail.brief.jsonl")
    assert brief == first  # not rewritten, not duplicated, the cut line removed
    assert all(b["conversations"][1]["value"] in {f"cat {int(b['id']) - 100} resting", f"A cat {int(b['id']) - 100} on a sofa."}
               for b in brief)
    assert len(endpoint.requests) == 4


def test_bad_arguments_and_inputs_are_clear_errors(endpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv(endpoint, tmp_path, tmp_path / "o.jsonl", "--concurrency", "0"))
    assert e.value.code == 2 and "concurrency must be >= 1" in capsys.readouterr().err
    assert main(argv(endpoint, tmp_path / "missing.json", tmp_path / "o.jsonl")) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "a.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n')
    bad = argv(endpoint, tmp_path / "a.jsonl", tmp_path / "o.jsonl")
    bad[bad.index("--endpoint") + 1] = f"ftp://user:{KEY}@host"
    assert main(bad) == 2
    captured = assert_no_key(capsys)
    assert "endpoint must be an http(s) URL" in captured.err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_interrupt_keeps_the_answers_received_and_a_rerun_finishes_without_asking_twice(endpoint, tmp_path, write_coco,
                                                                                      capsys, sig, code):
    """A real SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill) to a real `python -m fastllava.datagen`, mid-run."""
    write_coco(tmp_path, 12)
    endpoint.script = {"cat": [("delay", 0.6, GOOD)]}
    out = tmp_path / "conv.jsonl"
    env = {**os.environ, "FASTLLAVA_DATAGEN_API_KEY": KEY, "FASTLLAVA_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "fastllava.datagen",
                             *argv(endpoint, tmp_path, out, "--concurrency", "2")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A shell without job control starts background jobs (`pytest &`) with SIGINT
                            # ignored, which children inherit and Python then leaves ignored: restore it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(lines(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted: the answers received so far are in" in err and "Traceback" not in err
    assert KEY not in err
    kept = [r["id"] for r in lines(out)]  # every line complete (lines() parses each one)
    assert 3 <= len(kept) < 12
    asked_before = len(endpoint.requests)
    assert asked_before == len(kept)  # each request that was in flight at Ctrl-C was waited for and kept

    assert main(argv(endpoint, tmp_path, out)) == 0
    assert f"{12 - len(kept)} written, 0 rejected, 0 failed, {len(kept)} already done of 12 images" in capsys.readouterr().err
    assert sorted(r["id"] for r in lines(out)) == [str(100 + i) for i in range(12)]
    asked = [b["messages"][-1]["content"].split(" resting")[0] for _, _, b in endpoint.requests]
    assert sorted(asked) == sorted(f"cat {i}" for i in range(12))  # no image asked for twice
