"""python -m fastllava.datagen: generate LLaVA instruction data from COCO-style annotations with any
OpenAI-compatible chat endpoint. The API key comes from $FASTLLAVA_DATAGEN_API_KEY or $OPENAI_API_KEY."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..extras import cli
from .client import openai_module, scrub
from .messages import KINDS
from .run import DatagenConfig, run

EPILOG = """\
Input: COCO captions_*.json / instances_*.json (files or a folder), or JSONL lines
{"image", "id"?, "captions": [...], "boxes": [{"category", "bbox": [x1, y1, x2, y2] in [0, 1]}]}.
Output: LLaVA training records appended to --out; unusable answers go to <out>.rejects.jsonl.
Rerunning the same command skips images already in either file and retries failed requests.
With --kind detail, brief-description samples (an instruction answered by one of the image's captions, no
request needed) are also appended to <out>.brief.jsonl.
Needs the openai package: pip install "fastllava[datagen]".
Exit status: 0 when every image was answered (written or rejected), 1 when requests failed, 2 on bad
arguments or input or without openai, 130 on Ctrl-C and 143 on SIGTERM (the answers received are kept;
rerun to continue).
"""


def parse_args(argv=None) -> DatagenConfig:
    p = argparse.ArgumentParser(prog="python -m fastllava.datagen", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", nargs="+", required=True, metavar="PATH", help="annotation files or folders")
    p.add_argument("--kind", required=True, choices=KINDS, help="what to generate")
    p.add_argument("--endpoint", required=True, metavar="URL",
                   help="OpenAI-compatible API base, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL (appended to)")
    p.add_argument("--prompts", metavar="DIR", help="prompt folder in LLaVA's layout (default: ours for --kind)")
    p.add_argument("--image-prefix", default="", help="prefix for the output's image paths, e.g. coco/train2017/")
    d = DatagenConfig.__dataclass_fields__
    p.add_argument("--concurrency", type=int, default=d["concurrency"].default, help="requests in flight (default %(default)s)")
    p.add_argument("--max-retries", type=int, default=d["max_retries"].default, help="retries per request (default %(default)s)")
    p.add_argument("--timeout", type=float, default=d["timeout"].default, help="seconds per request (default %(default)s)")
    p.add_argument("--backoff", type=float, default=d["backoff"].default, help="seconds before the first retry, doubling (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d["temperature"].default, help="(default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d["max_tokens"].default, help="(default %(default)s)")
    p.add_argument("--limit", type=int, help="ask for at most this many new images in this run (--kind detail writes "
                   "every brief sample regardless: they cost no request)")
    args = p.parse_args(argv)
    try:
        return DatagenConfig(**vars(args))
    except ValueError as e:
        p.error(scrub(str(e)))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job, `kill`), handled as Ctrl-C is."""


def _raise_terminated(signum, frame):
    raise Terminated()


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    openai_module()  # before any work: --kind detail writes its brief samples before the first request
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        summary = run(cfg)
    except ValueError as e:  # bad annotations, prompt folder or endpoint
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # run() has kept every answer that came back
        print(f"\ninterrupted: the answers received so far are in {cfg.out} and {cfg.rejects}; rerun the same "
              "command to continue with the rest", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # the shell's codes for SIGTERM and Ctrl-C
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(summary, file=sys.stderr)
    if summary.failed:
        print(f"{summary.failed} request(s) failed; rerun the same command to retry them "
              "(images already done are skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
