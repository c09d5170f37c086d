"""What the Hub tests share: a Hub cache laid out as huggingface_hub lays it out (models--org--name/blobs,
snapshots/<sha>/ links to the blobs, refs/<branch or tag>) read offline, and a loopback server speaking
the Hub's HTTP API, for huggingface_hub itself to read and download from."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from fastllava import Llava
from fastllava.model import hub


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub reads offline (its constants are read at import, so set there)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_resolved", {})
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "fastllava-cache"))
    return cache


def put(cache, repo_id, src, refs=("main",)) -> str:
    """Store directory `src` as one commit of `repo_id` in the Hub cache, each ref pointing to it; its sha."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    sha = hashlib.sha1(b"".join(p.relative_to(src).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = repo / "snapshots" / sha / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return sha


def assert_same(a: Llava, b: Llava):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


class LoopbackHub:
    """Enough of the Hub's HTTP API for snapshot_download (revision info, the file tree, resolve/ HEAD and
    GET), serving local directories as repositories at one commit each; records every file fetched. A repository
    in `gated` answers as the Hub does without an accepted license (403, X-Error-Code: GatedRepo)."""

    def __init__(self, repos: dict, gated=()):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.gated = set(gated)

        self.files = {repo: {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
                      for repo, src in repos.items()}
        self.fetched = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                status, body, headers = hub_.answer(self.command, self.path.split("?")[0])
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method, path):
        for repo in self.gated:
            if f"/{repo}/" in path:
                return 403, b"gated", {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to {repo} is restricted"}
        for repo, files in self.files.items():
            sha = hashlib.sha1(repo.encode()).hexdigest()
            if path.startswith(f"/api/models/{repo}/revision/"):
                info = {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]
                return 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}
            if path.startswith(f"/{repo}/resolve/"):
                name = path[len(f"/{repo}/resolve/"):].split("/", 1)[1]
                if method == "GET":
                    self.fetched.append(f"{repo}/{name}")
                body = files[name]
                return 200, body, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
        return 404, b"not found", {"X-Error-Code": "RepoNotFound"}


def resolve_online(endpoint, cache, ref, call="resolve", **kwargs) -> subprocess.CompletedProcess:
    """hub.<call>(ref, **kwargs) (resolve, resolve_projector) printed by a fresh process (huggingface_hub reads
    HF_ENDPOINT at import) against `endpoint`."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    code = f"from fastllava.model.hub import {call}; print({call}({ref!r}, **{kwargs!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def snapshot_of(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]
