"""The loopback HTTP server and the small fakes of every source of every `prepare` name, shared by the
test_prepare*.py files (imported as a module; the tests here check the fakes themselves).

The server answers two kinds of path:
  /<behaviour>/<name>  server.files[name] with a behaviour: range (honours Range), norange, missing (404),
                       flaky (503 once), drop (half, then hang up, once), slow (half, then stall, once),
                       short (always half);
  /<host>/<path>       server.files["<host>/<path>"], as `range` unless server.kinds names another
                       behaviour for that key (any of the above, or trickle: 2 KiB every 20 ms).
Each request's path and Range header are logged in server.log, its Authorization header in server.auth;
server.spans[path] the (start, last piece) monotonic times of each trickled answer.
`mirror_args(server)` points every host of sources.hosts() at /<host>/ through --mirror, the option a user
with a mirror uses; `serve_fakes(server)` serves a fake of every file of every name at its real URL's path,
shaped like the real one (the archives' top folders, the json's image paths).
"""

import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from fastllava.data.prepare.sources import DATASETS, HUB, hosts

BEHAVIOURS = ("range", "norange", "missing", "flaky", "drop", "slow", "short", "trickle")
TRICKLE = 2048  # bytes per piece of a trickling answer, one piece every 20 ms


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output quiet
        pass

    def do_GET(self):
        srv = self.server
        self._answer(srv)

    def _answer(self, srv):
        path = self.path.lstrip("/")
        kind, _, name = path.partition("/")
        if kind not in BEHAVIOURS:
            kind, name = srv.kinds.get(path, "range"), path
        with srv.lock:
            srv.log.append((path, self.headers.get("Range")))
            srv.auth[path] = self.headers.get("Authorization")
            first = srv.hits.setdefault(path, 0) == 0
            srv.hits[path] += 1
        data = srv.files.get(name)
        if kind == "missing" or data is None:
            return self.send_error(404)
        if kind == "flaky" and first:
            return self.send_error(503)
        if kind in ("drop", "slow") and first or kind == "short":
            # Announce the whole file, send half, then hang up (drop, short) or stall (slow).
            self._head(200, len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if kind == "slow":
                time.sleep(1.0)  # past the client's 0.3 s timeout
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and kind != "norange":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self._head(206, len(data) - start, f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self._head(200, len(data))
        if kind != "trickle":
            return self.wfile.write(data[start:])
        began = time.monotonic()
        for i in range(start, len(data), TRICKLE):
            if i + TRICKLE >= len(data):  # recorded before the last piece: the client cannot be done before it
                with srv.lock:
                    srv.spans.setdefault(path, []).append((began, time.monotonic()))
            else:
                time.sleep(0.02)
            self.wfile.write(data[i : i + TRICKLE])
            self.wfile.flush()

    def _head(self, status, length, content_range=None):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)  # Hub files at huggingface.co's paths, mirrored below
    monkeypatch.delenv("HF_TOKEN", raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.kinds, srv.log, srv.hits, srv.auth, srv.lock = {}, {}, [], {}, {}, threading.Lock()
    srv.spans = {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def mirror_args(server, extra_hosts=()):
    """--mirror HOST=<server>/HOST for every host a source is on (and `extra_hosts`)."""
    return [a for h in (*hosts(), *extra_hosts) for a in ("--mirror", f"{h}={server.url}/{h}")]


def key_of(url):
    """The server's key for a real URL: its host and path."""
    parts = urlsplit(url)
    return parts.netloc + parts.path


def real_url(f):
    return f.address(HUB, {}, {})


def blob(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def image_bytes(seed, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), seed * 40 % 256, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def zip_of(members):
    """A zip holding {name: bytes}; a name ending in "/" is a folder entry, as real archives have."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def entry(i, image=None):
    e = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "What is it?"},
                                          {"from": "gpt", "value": f"thing {i}"}]}
    return {**e, "image": image} if image else e


def entries_json(images):
    return json.dumps([entry(i, im) for i, im in enumerate(images)]).encode()


# The images each fake json names (relative to its check's image folder) and where each archive holds them.
PRETRAIN_IMAGES = ("00000/0.jpg", "00000/1.jpg", "00001/2.jpg")
MIX_IMAGES = ("coco/train2017/000000000009.jpg", "gqa/images/2354786.jpg", "ocr_vqa/images/1000.jpg",
              "ocr_vqa/images/1001.jpg", "textvqa/train_images/0a0bc91825468c45.jpg", "vg/VG_100K/1.jpg",
              "vg/VG_100K_2/2.jpg", None)  # None: a text-only entry, as the mix has; 1001 is a GIF in the mirror


def _sqa_problem(split, image):
    return {"question": f"Which is {split}?", "hint": "", "lecture": "L.", "solution": "S.", "choices": ["a", "b"],
            "answer": 1, "image": image, "split": split}


SQA_PROBLEMS = {"1": _sqa_problem("train", "image.png"), "2": _sqa_problem("val", None),
                "3": _sqa_problem("test", "image.png")}


def fakes():
    """{real URL's host + path: bytes} for every file of every dataset name."""
    hub = "huggingface.co/datasets"
    jpg = {f"{i}": image_bytes(i) for i in range(10)}
    out = {
        f"{hub}/liuhaotian/LLaVA-Pretrain/resolve/main/blip_laion_cc_sbu_558k.json": entries_json(PRETRAIN_IMAGES),
        f"{hub}/liuhaotian/LLaVA-Pretrain/resolve/main/images.zip":
            zip_of({im: jpg[str(i)] for i, im in enumerate(PRETRAIN_IMAGES)}),
        f"{hub}/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_v1_5_mix665k.json": entries_json(MIX_IMAGES),
        f"{hub}/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_instruct_158k.json":
            entries_json(("000000000025.jpg", "000000000009.jpg")),
        "images.cocodataset.org/zips/train2017.zip": zip_of({"train2017/": b"", "train2017/000000000009.jpg": jpg["1"],
                                                              "train2017/000000000025.jpg": jpg["2"]}),
        "downloads.cs.stanford.edu/nlp/data/gqa/images.zip": zip_of({"images/2354786.jpg": jpg["3"]}),
        f"{hub}/qnguyen3/ocr_vqa/resolve/main/ocr_vqa.zip":
            zip_of({"ocr_vqa/1000.jpg": jpg["4"], "ocr_vqa/1001.gif": image_bytes(5, "GIF")}),
        "dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip":
            zip_of({"train_images/": b"", "train_images/0a0bc91825468c45.jpg": jpg["6"]}),
        "cs.stanford.edu/people/rak248/VG_100K_2/images.zip": zip_of({"VG_100K/1.jpg": jpg["7"]}),
        "cs.stanford.edu/people/rak248/VG_100K_2/images2.zip": zip_of({"VG_100K_2/2.jpg": jpg["8"]}),
        f"{hub}/liuhaotian/LLaVA-CC3M-Pretrain-595K/resolve/main/chat.json": entries_json(("GCC_train_000000000.jpg",)),
        f"{hub}/liuhaotian/LLaVA-CC3M-Pretrain-595K/resolve/main/images.zip":
            zip_of({"GCC_train_000000000.jpg": jpg["9"]}),
        "raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa/problems.json":
            json.dumps(SQA_PROBLEMS).encode(),
        "raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa/pid_splits.json":
            json.dumps({"train": ["1"], "val": ["2"], "test": ["3"]}).encode(),
        "scienceqa.s3.us-west-1.amazonaws.com/images/train.zip": zip_of({"train/1/image.png": image_bytes(1, "PNG")}),
        "scienceqa.s3.us-west-1.amazonaws.com/images/val.zip": zip_of({"val/": b""}),  # val: text-only here
        "scienceqa.s3.us-west-1.amazonaws.com/images/test.zip": zip_of({"test/3/image.png": image_bytes(3, "PNG")}),
    }
    return out


def serve_fakes(server):
    server.files.update(fakes())


def test_every_file_of_every_name_has_a_fake():
    served = fakes()
    wanted = {key_of(real_url(f)) for ds in DATASETS.values() for f in ds.files}
    assert wanted == set(served), "a source without a fake, or a fake no source fetches"


def test_fakes_answer_at_the_real_paths_through_the_mirror(server):
    import urllib.request

    serve_fakes(server)
    f = DATASETS["llava-1.5-finetune"].files[1]  # COCO, on its own host
    mirrors = dict(a.split("=", 1) for a in mirror_args(server)[1::2])
    url = f.address(HUB, {}, mirrors)
    assert url == f"{server.url}/images.cocodataset.org/zips/train2017.zip"
    assert urllib.request.urlopen(url).read() == server.files[key_of(real_url(f))]
