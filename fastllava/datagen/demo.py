"""python -m fastllava.datagen.demo: the datagen pipeline end to end, offline, on the demo world.

1. Draws N demo-world scenes (fastllava.demo.world.draw_scene) into OUT/images/ (OUT: --out, default
   outputs/datagen-demo) and writes their exact symbolic descriptions to OUT/annotations.jsonl in
   datagen's simple JSONL format:
   {"image", "id", "captions": [...], "boxes": [{"category": "red circle", "bbox": [x1, y1, x2, y2]}]}.
2. Starts a rule-based stand-in for an OpenAI-compatible chat endpoint on 127.0.0.1 (a free port, a
   thread). It reads only the last user message (the captions and "category: [x1, y1, x2, y2]" lines that
   fastllava.datagen sends) and answers in the format fastllava.datagen.validate parses: questions and
   answers about the colours, counts and positions of the boxes.
3. Runs fastllava.datagen's own main() against it (model "rule-based", a dummy API key), writing
   OUT/<kind>.jsonl (and, for --kind detail, the brief descriptions OUT/detail.brief.jsonl), and prints
   datagen's summary.

No network and no model: this shows what the pipeline does and checks that its pieces fit. Rerunning with
the same arguments draws the same images and skips the ones already generated, as datagen does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..demo.world import DEFAULT_IMAGE_SIZES, describe, draw_scene
from ..extras import cli
from .annotations import BOX_DECIMALS
from .client import openai_module
from .messages import KINDS

MODEL = "rule-based"
DEFAULT_OUT = os.path.join("outputs", "datagen-demo")  # beside the training demo's outputs/demo-*
DUMMY_KEY = "rule-based-demo-key"
KEY_ENV = "FASTLLAVA_DATAGEN_API_KEY"

# ---------------------------------------------------------------------------------------- annotations


def scene_record(index: int, image_name: str, size: tuple[int, int], shapes) -> dict:
    """The datagen simple-format record of one drawn scene: its description as the caption and one box per
    shape ("<color> <kind>"), normalized [x1, y1, x2, y2] from the shape's inclusive pixel box."""
    width, height = size
    boxes = []
    for s in sorted(shapes, key=lambda s: s.cell):
        x0, y0, x1, y1 = s.box
        bbox = [x0 / width, y0 / height, (x1 + 1) / width, (y1 + 1) / height]
        boxes.append({"category": f"{s.color} {s.kind}",
                      "bbox": [round(min(max(v, 0.0), 1.0), BOX_DECIMALS) for v in bbox]})
    n = len(shapes)
    caption2 = (f"A {width}x{height} picture with {n} {shapes[0].color} "
                f"{shapes[0].kind}{'' if n == 1 else 's'} on a plain neutral background.")
    return {"image": image_name, "id": f"{index:06d}", "captions": [describe(shapes), caption2], "boxes": boxes}


def write_scenes(out: str, n_images: int, seed: int = 0) -> str:
    """Draw `n_images` scenes into out/images/NNNNNN.jpg and write out/annotations.jsonl; returns its path.
    Deterministic for a seed."""
    rng = random.Random(f"{seed}-datagen-demo")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = os.path.join(out, "annotations.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_images):
            size = rng.choice(DEFAULT_IMAGE_SIZES)
            image, shapes = draw_scene(rng, size)
            name = f"{i:06d}.jpg"
            image.save(os.path.join(out, "images", name), format="JPEG", quality=90)
            f.write(json.dumps(scene_record(i, name, size, shapes)) + "\n")
    return path


# ------------------------------------------------------------------------------ the rule-based "model"

_BOX_LINE = re.compile(r"^\s*(.+?)\s*:\s*\[\s*([-\d.eE]+)\s*,\s*([-\d.eE]+)\s*,\s*([-\d.eE]+)\s*,\s*([-\d.eE]+)\s*\]\s*$")
COLOR_WORDS = frozenset(
    "red green blue yellow purple orange pink brown black white gray grey cyan magenta violet".split())


def parse_context(text: str) -> tuple[list[str], list[tuple[str, tuple[float, float, float, float]]]]:
    """(captions, [(category, bbox), ...]) of a context as fastllava.datagen.messages sends it."""
    captions, boxes = [], []
    for line in text.splitlines():
        m = _BOX_LINE.match(line)
        if m:
            boxes.append((m.group(1), tuple(float(v) for v in m.groups()[1:])))
        elif line.strip():
            captions.append(line.strip())
    return captions, boxes


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"


def _place(bbox) -> tuple[int, int, str]:
    """(row, col, name) of a box by its centre: "top left", ..., with "middle"/"centre" near the middle."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    row = 0 if cy < 0.45 else 2 if cy > 0.55 else 1
    col = 0 if cx < 0.45 else 2 if cx > 0.55 else 1
    name = {(1, 1): "centre"}.get((row, col)) or " ".join(
        w for w in (("top", "middle", "bottom")[row], ("left", "", "right")[col]) if w)
    return row, col, name


class Scene:
    """What the context says: objects by category (colour + noun where the category starts with a colour)."""

    def __init__(self, boxes):
        self.boxes = boxes
        self.categories: dict[str, int] = {}
        for category, _ in boxes:
            self.categories[category] = self.categories.get(category, 0) + 1
        self.colors = []
        for category in self.categories:
            first = category.split()[0].lower()
            if first in COLOR_WORDS and first not in self.colors:
                self.colors.append(first)
        self.n = len(boxes)
        self.places = [p[2] for p in sorted(_place(b) for _, b in boxes)]

    def noun(self) -> str:
        """What to call the objects in a question: "circles" when they share a noun, else "objects"."""
        nouns = {c.split()[-1] for c in self.categories}
        noun = nouns.pop() if len(nouns) == 1 else "object"
        return noun if self.n == 1 else _plural(noun)

    def counts(self) -> str:
        parts = [f"{k} {c if k == 1 else _plural(c)}" for c, k in self.categories.items()]
        if len(parts) == 1:
            return f"There {'is' if self.n == 1 else 'are'} {parts[0]}."
        return f"There are {self.n} objects: {_join(parts)}."

    def where(self) -> str:
        if self.n == 1:
            return f"It is in the {self.places[0]} of the image."
        distinct = list(dict.fromkeys(self.places))
        return f"They are in the {_join(distinct)} of the image."


def rule_based_answer(kind: str, context: str) -> str:
    """An answer in validate.py's format for `kind`, derived from `context` alone."""
    captions, boxes = parse_context(context)
    if not boxes:  # nothing to count or place: talk about the caption
        caption = captions[0] if captions else "An image."
        if kind == "detail":
            return caption
        return f"Question:\nWhat does the image show?\n===\nAnswer:\n{caption}"
    s = Scene(boxes)
    noun = s.noun()
    pairs = [(f"How many {noun if s.n > 1 else _plural(noun)} are there in the image?", s.counts())]
    if s.colors:
        if s.n == 1:
            pairs.append((f"What color is the {noun}?", f"It is {s.colors[0]}."))
        else:
            pairs.append((f"What color are the {noun}?", f"They are {_join(s.colors)}."))
    pairs.append((f"Where {'is the' if s.n == 1 else 'are the'} {noun}?", s.where()))
    if s.n > 1 and s.colors:
        same = len(s.colors) == 1
        pairs.append((f"Do all the {noun} have the same color?",
                      f"Yes, they are all {s.colors[0]}." if same else f"No: there are {_join(s.colors)} ones."))
    if kind == "detail":
        return " ".join([s.counts()] + ([s.where()] if s.n else []))
    if kind == "reasoning":
        q = f"How are the {noun} arranged in the image?" if s.n > 1 else f"Where would I find the {noun}?"
        return f"Question:\n{q}\n===\nAnswer:\n{s.counts()} {s.where()}"
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in pairs)


class RuleBasedServer:
    """An OpenAI-compatible POST /v1/chat/completions on 127.0.0.1 (a free port, http.server in a daemon
    thread) whose "model" is rule_based_answer(kind, last user message). Use as a context manager."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    users = [m for m in body["messages"] if m.get("role") == "user"]
                    context = users[-1]["content"]
                except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                    return self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
                answer = rule_based_answer(server.kind, context)
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
                self._send(200, {
                    "id": "chatcmpl-rule-based", "object": "chat.completion", "created": 0,
                    "model": body.get("model", MODEL),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                              "total_tokens": prompt_tokens + len(answer.split())}})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rule-based-server", daemon=True)
        self._thread.start()

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def _dummy_key():
    """FASTLLAVA_DATAGEN_API_KEY set to a dummy for the run (it wins over $OPENAI_API_KEY, so no real key is
    sent even to loopback), restored afterwards."""
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = DUMMY_KEY
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


# --------------------------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastllava.datagen.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="folder for images/, annotations.jsonl and <kind>.jsonl (created if missing; "
                        "default %(default)s)")
    p.add_argument("--images", type=int, default=8, metavar="N", help="scenes to draw (default %(default)s)")
    p.add_argument("--kind", choices=KINDS, default="conversation", help="what to generate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} exists and is not a folder")
    return args


@cli
def main(argv=None) -> int:
    args = parse_args(argv)
    openai_module()  # datagen's client: checked before any scene is drawn
    from .__main__ import main as datagen_main

    try:
        annotations = write_scenes(args.out, args.images, args.seed)
    except OSError as e:
        print(f"error: cannot write the scenes to {args.out!r}: {e}", file=sys.stderr)
        return 2
    print(f"drew {args.images} scenes into {os.path.join(args.out, 'images')}; annotations: {annotations}",
          file=sys.stderr)
    out = os.path.join(args.out, f"{args.kind}.jsonl")
    with RuleBasedServer(args.kind) as server, _dummy_key():
        print(f"rule-based endpoint: {server.url} (model {MODEL!r})", file=sys.stderr)
        rc = datagen_main(["--annotations", annotations, "--kind", args.kind, "--endpoint", server.url,
                           "--model", MODEL, "--out", out, "--concurrency", str(args.concurrency),
                           "--timeout", "30", "--max-retries", "2", "--backoff", "0.1"])
    if rc == 0:
        print(f"output: {out} (image paths relative to {os.path.join(args.out, 'images')})", file=sys.stderr)
        if args.kind == "detail":
            print(f"brief descriptions: {os.path.splitext(out)[0]}.brief.jsonl", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
