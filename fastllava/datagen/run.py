"""The generation loop: annotations -> prompts -> concurrent requests -> validated LLaVA records.

Output: one JSON line per image appended to `out` ({"id", "image", "conversations"}, what
fastllava.data.files reads) and flushed as it is written; unusable answers go, with their reason, to
`<out without extension>.rejects.jsonl`. On start, ids already in either file are skipped, so a run that
was interrupted continues where it stopped and never writes an image twice. A request that fails for good
(retries spent) is counted and written nowhere: the next run asks again. Images without captions are
skipped, counted and listed: the captions are what the model writes from.

`--kind detail` also appends one brief-description sample per image to `<out without extension>.brief.jsonl`
before any request (an instruction from BRIEF_INSTRUCTIONS answered by one of the image's captions; the
paper's caption data, what stage 1 trains on), with the same skip-what-is-there resume.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO

from ..data.files import IMAGE_TAG, SampleError, validate_entry
from ..progress import progress
from .annotations import ImageContext, load_annotations
from .client import ChatClient, RequestFailed, scrub
from .messages import BRIEF_INSTRUCTIONS, KINDS, default_prompt_dir, load_prompt, pick
from .validate import Invalid, to_conversations


@dataclass
class DatagenConfig:
    annotations: list[str]
    kind: str
    endpoint: str
    model: str
    out: str
    prompts: str | None = None  # a prompt folder; default: ours for `kind`
    image_prefix: str = ""  # put before each image path in the output ("coco/train2017/")
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0  # seconds per request
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    temperature: float = 0.7
    max_tokens: int = 1024
    limit: int | None = None  # ask for at most this many new images in this run (brief samples: all)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.annotations:
            raise ValueError("give at least one annotations file or folder")
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.timeout > 0 or not self.backoff >= 0:
            raise ValueError(f"timeout must be > 0 and backoff >= 0 seconds, got {self.timeout} and {self.backoff}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not self.out:
            raise ValueError("give an output file (--out)")

    @property
    def rejects(self) -> str:
        return os.path.splitext(self.out)[0] + ".rejects.jsonl"

    @property
    def brief(self) -> str:
        return os.path.splitext(self.out)[0] + ".brief.jsonl"


@dataclass
class Summary:
    images: int = 0  # in the annotations
    uncaptioned: list[str] = field(default_factory=list)  # ids of images without captions (skipped)
    skipped: int = 0  # already in the output or rejects
    brief: int = 0  # brief-description samples written (--kind detail)
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: int = 0
    requests: int = 0  # HTTP requests, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def postfix(self) -> str:
        return (f"req {self.requests} tok {self.prompt_tokens + self.completion_tokens} "
                f"rej {sum(self.rejected.values())} fail {self.failed}")

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        text = (f"datagen: {self.written} written, {sum(self.rejected.values())} rejected"
                + (f" ({reasons})" if reasons else "")
                + f", {self.failed} failed, {self.skipped} already done of {self.images} images; "
                f"{self.requests} requests, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")
        if self.brief:
            text += f"; {self.brief} brief descriptions written"
        if self.uncaptioned:
            ids = ", ".join(self.uncaptioned[:10]) + (", ..." if len(self.uncaptioned) > 10 else "")
            text += f"\nskipped {len(self.uncaptioned)} image(s) without captions (ids {ids})"
        return text


def done_ids(path: str) -> set[str]:
    """Ids in a JSONL file written by an earlier run. A last line cut short (the run was killed while
    writing it) is removed from the file, so that appending starts on a fresh line."""
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path, "rb+") as f:
        data = f.read()
        good = 0  # byte offset after the last complete line
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            end = good + len(line) + 1
            if not line.strip():
                good = min(end, len(data))
                continue
            try:
                ids.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                if end <= len(data):  # a complete line: not ours to repair
                    raise ValueError(f"{path} line {lineno} is not a record with an 'id'; is this the output "
                                     "of fastllava.datagen?") from None
                print(f"{path}: removing an incomplete last line left by an interrupted run", file=sys.stderr)
                f.truncate(good)
                break
            good = min(end, len(data))
        else:
            if data and not data.endswith(b"\n"):
                f.write(b"\n")  # a complete record without its newline
    return ids


def _append(f: IO[str], record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()  # per record: a kill loses at most the line being written


def run(cfg: DatagenConfig, *, client: ChatClient | None = None, log: IO[str] | None = None) -> Summary:
    """Generate `cfg.kind` samples for every image in `cfg.annotations` not yet in the output."""
    log = sys.stderr if log is None else log
    contexts = load_annotations(cfg.annotations)
    summary = Summary(images=len(contexts), uncaptioned=[c.id for c in contexts if not c.captions])
    contexts = [c for c in contexts if c.captions]
    prompt = load_prompt(cfg.prompts or default_prompt_dir(cfg.kind))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    if cfg.kind == "detail":
        summary.brief = write_brief(cfg, contexts)
    done = done_ids(cfg.out) | done_ids(cfg.rejects)
    todo = [c for c in contexts if c.id not in done]
    summary.skipped = len(contexts) - len(todo) + len(summary.uncaptioned)
    todo = todo[: cfg.limit] if cfg.limit is not None else todo
    if client is None:
        client = ChatClient(cfg.endpoint, cfg.model, timeout=cfg.timeout, max_retries=cfg.max_retries,
                            backoff=cfg.backoff, temperature=cfg.temperature, max_tokens=cfg.max_tokens)

    def ask(ctx: ImageContext):
        try:
            return client.chat(prompt.messages(ctx.text()))
        except RequestFailed as e:
            return e

    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="datagen")
    pending: dict = {}
    queue = iter(todo)
    with open(cfg.out, "a", encoding="utf-8") as out, open(cfg.rejects, "a", encoding="utf-8") as rejects, \
            progress(len(todo), desc=f"datagen {cfg.kind}", unit="image", file=log) as bar:

        def finish(future):
            _record(cfg, pending.pop(future), future.result(), summary, out, rejects, bar)
            bar.update()
            bar.set_postfix(summary.postfix())

        try:
            while True:
                # A window of 2x concurrency requests in flight: the pool stays busy, memory stays small.
                while len(pending) < 2 * cfg.concurrency and (ctx := next(queue, None)) is not None:
                    pending[pool.submit(ask, ctx)] = ctx
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(future)
        except BaseException:
            # Interrupted (Ctrl-C, a crash): let the requests in flight end and keep the answers that
            # came back, which were paid for; the next run asks only for the rest.
            pool.shutdown(wait=True, cancel_futures=True)
            for future in list(pending):
                if future.done() and not future.cancelled() and future.exception() is None:
                    finish(future)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return summary


def brief_record(ctx: ImageContext, image_prefix: str = "") -> dict:
    """The brief-description sample of one image: a drawn instruction, answered by a drawn caption."""
    return {"id": ctx.id, "image": image_prefix + ctx.image, "conversations": [
        {"from": "human", "value": IMAGE_TAG + "\n" + pick(BRIEF_INSTRUCTIONS, ctx.id, "brief")},
        {"from": "gpt", "value": pick(ctx.captions, ctx.id, "caption")}]}


def write_brief(cfg: DatagenConfig, contexts: list[ImageContext]) -> int:
    """Append the brief samples of the images not yet in cfg.brief; returns how many were written."""
    done = done_ids(cfg.brief)
    n = 0
    with open(cfg.brief, "a", encoding="utf-8") as f:
        for ctx in contexts:
            if ctx.id not in done:
                record = brief_record(ctx, cfg.image_prefix)
                try:
                    validate_entry(record)
                except SampleError as e:
                    raise ValueError(f"image {ctx.id}: its brief-description sample is not a valid LLaVA "
                                     f"record ({e}); record: {json.dumps(record)[:300]}") from None
                _append(f, record)
                n += 1
    return n


def _record(cfg, ctx, reply, summary, out, rejects, bar) -> None:
    if isinstance(reply, RequestFailed):
        summary.failed += 1
        summary.requests += reply.attempts
        if summary.failed <= 5:
            bar.write(scrub(f"image {ctx.id}: {reply}"))
        return
    summary.requests += reply.attempts
    summary.prompt_tokens += reply.prompt_tokens
    summary.completion_tokens += reply.completion_tokens
    try:
        conversations = to_conversations(cfg.kind, ctx.id, reply.text)
    except Invalid as e:
        summary.rejected[e.reason] += 1
        _append(rejects, {"id": ctx.id, "image": cfg.image_prefix + ctx.image, "kind": cfg.kind,
                          "reason": e.reason, "detail": scrub(e.detail), "answer": scrub(reply.text or "")})
        return
    record = {"id": ctx.id, "image": cfg.image_prefix + ctx.image, "conversations": conversations}
    validate_entry(record)  # our parser's guarantee; a failure here is a bug, not bad data
    _append(out, record)
    summary.written += 1
