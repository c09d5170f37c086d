"""Shared by the judge tests: `fake(reply)` starts a local OpenAI-compatible server (test_judge.FakeOpenAI)
on a loopback socket with the judge key set in the environment, and stops it after the test."""

import pytest
from test_judge import KEY, FakeOpenAI


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    servers = []

    def start(reply):
        servers.append(FakeOpenAI(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
