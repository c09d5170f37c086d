"""A scripted OpenAI-compatible server on loopback (real sockets, http.server in a thread) and tiny
annotation files, for the datagen tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeEndpoint:
    """Serves POST /v1/chat/completions. The reply is chosen by the first script key found in the last
    user message (the image's context); each key has a list of steps used one per request, the last one
    repeating. A step is ("ok", text), ("status", code, body, headers) or ("delay", seconds, text).
    Every request is recorded as (time, headers, body)."""

    def __init__(self):
        self.script: dict[str, list[tuple]] = {}
        self.requests: list[tuple[float, dict, dict]] = []
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint._lock:
                    endpoint.requests.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                    step = endpoint._next_step(body["messages"][-1]["content"])
                if self.path != "/v1/chat/completions":
                    step = ("status", 404, "not found", {})
                if step[0] == "delay":
                    time.sleep(step[1])
                    step = ("ok", step[2])
                if step[0] == "status":
                    _, code, text, headers = step
                    text = text.replace("{auth}", self.headers.get("Authorization", ""))
                    self._send(code, {"error": {"message": text, "type": "server_error"}}, headers)
                    return
                content = step[1]
                self._send(200, {
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}, {})

            def _send(self, code, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _next_step(self, context: str) -> tuple:
        for key, steps in self.script.items():
            if key in context:
                n = self._calls.get(key, 0)
                self._calls[key] = n + 1
                return steps[min(n, len(steps) - 1)]
        return ("ok", DEFAULT_ANSWER)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


DEFAULT_ANSWER = "Question:\nWhat is in the image?\n===\nAnswer:\nA cat on a sofa.\n===\nQuestion:\nWhat color is it?\n===\nAnswer:\nOrange."


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def write_coco(folder, n_images=3):
    """captions_tiny.json and instances_tiny.json with n_images images ("cat <i>" in their captions)."""
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    captions = [{"id": j, "image_id": 100 + i, "caption": f"A cat {i} on a sofa. " if j % 2 else f"cat {i} resting"}
                for i in range(n_images) for j in (2 * i, 2 * i + 1)]
    instances = [{"id": 1000 + i, "image_id": 100 + i, "category_id": 17, "bbox": [64, 48, 320, 240]}
                 for i in range(n_images)]
    (folder / "captions_tiny.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "instances_tiny.json").write_text(json.dumps(
        {"images": images, "annotations": instances, "categories": [{"id": 17, "name": "cat"}]}))
    return folder


@pytest.fixture(name="write_coco")
def write_coco_fixture():
    """The write_coco(folder, n_images) helper, as a fixture (test folders are not packages)."""
    return write_coco
