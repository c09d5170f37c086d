"""The data setup before the first step on a file shaped like llava_v1_5_mix665k.json, beside LLaVA's loader.

    python benchmarks/bench_startup.py [--entries 665298] [--ranks 1 2] [--dir /tmp/fastllava-startup]
                                       [--workers N] [--source DIR] [--template vicuna_v1]

Figures of 2026-12-06 (2-core CPU, 665,298 entries, 1 and 8 processes, four commits side by side):
docs/data.md, "Start-up: the cold start of a 665K-entry file".

Generates (once, kept in --dir) a JSON list of --entries conversations drawn from fastllava.data.profile's
`mix665k` model: its sources in their proportions, each with its rounds and question/answer lengths
(converted from LLaMA tokens to words at 0.75 words per token; 1,053 MB for the full count), an `<image>` tag in the first human turn
of every image source, ShareGPT's entries text-only. Words come from a fixed English-like list, so the
project's small test tokenizer (fastllava.testing.write_llama_tokenizer, the one tokenizer available
offline) makes more tokens per word than LLaMA's: lengths are longer than the real mix's and the
tokenization takes longer.

Then times, each in fresh processes:
  llava      LLaVA's loader: json.load of the file + the word counts of its `modality_lengths`
             (llava/train/train.py, what group_by_modality_length sorts by).
  fastllava  what train() does before the first step, in R processes started together with RANK,
             LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE set as torchrun sets them: LlavaDataset (read and
             validate), lengths(), and the StepLoader's plan of every step; the figure is the slowest
             rank's. `cold` starts with an empty length cache, `warm` with the cache the cold run left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastllava.data.profile import MIX665K, SHORT_ANSWER_PROMPT, _proportional_counts

WORDS_PER_TOKEN = 0.75  # English text with LLaMA's tokenizer: ~1.3 tokens per word
VOCABULARY = ("the a of and to in is on with that this there what which how many color image picture person "
              "people man woman car street table dog cat red blue green white black left right small large "
              "standing sitting holding looking near next behind front wearing shirt building sky water tree "
              "answer question describe detail shown appears visible scene background object two three yes no "
              "because while would could should also however example photo region box book title author "
              "genre written code function value return number between").split()
SHORT_PROMPT = "Answer the question using a single word or phrase."
SHORT_ANSWER_SOURCES = ("vqav2", "gqa", "okvqa", "ocrvqa")  # their questions end with SHORT_PROMPT


def _words(rng: np.random.Generator, tokens: int) -> str:
    n = max(1, int(round(tokens * WORDS_PER_TOKEN)))
    return " ".join(VOCABULARY[i] for i in rng.integers(0, len(VOCABULARY), size=n))


def generate_mix(path: Path, entries: int, seed: int = 0) -> None:
    """Write a JSON list of `entries` LLaVA-format samples drawn from the mix665k model (module docstring)."""
    counts = _proportional_counts(np.array([s.count for s in MIX665K], dtype=np.int64), entries)
    data = []
    for k, (src, count) in enumerate(zip(MIX665K, counts.tolist())):
        rng = np.random.Generator(np.random.PCG64([seed, k]))
        rounds = np.minimum(1 + rng.poisson(src.rounds_mean - 1.0, size=count), src.rounds_max)
        short = src.name in SHORT_ANSWER_SOURCES
        for j, r in enumerate(rounds.tolist()):
            turns = []
            for t in range(r):
                q_tokens = rng.lognormal(np.log(src.question_median), src.sigma)
                question = _words(rng, q_tokens - (SHORT_ANSWER_PROMPT if short else 0))
                if short:
                    question += "\n" + SHORT_PROMPT
                if t == 0 and src.has_image:
                    question = "<image>\n" + question
                turns.append({"from": "human", "value": question})
                turns.append({"from": "gpt", "value": _words(rng, rng.lognormal(np.log(src.answer_median), src.sigma))})
            entry = {"id": f"{src.name}-{j:07d}"}
            if src.has_image:
                entry["image"] = f"{src.name}/images/{j:07d}.jpg"
            entry["conversations"] = turns
            data.append(entry)
    order = np.random.Generator(np.random.PCG64([seed, len(MIX665K)])).permutation(len(data))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([data[i] for i in order.tolist()], f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ timing

LLAVA_LOADER = """
import json, sys, time
t = time.perf_counter()
data = json.load(open(sys.argv[1]))
# llava/train/train.py LazySupervisedDataset.modality_lengths: what group_by_modality_length sorts by
lengths = [sum(len(c["value"].split()) for c in s["conversations"]) * (1 if "image" in s else -1) for s in data]
print(json.dumps({"total": time.perf_counter() - t}))
"""


def rank_main(args) -> None:
    """One rank: wait for the others (a file per rank in --dir), then what train() does before the first step."""
    from fastllava.data.dataset import LlavaDataset
    from fastllava.data.loader import StepLoader

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ready = Path(args.dir, "ready")
    (ready / str(rank)).touch()
    while len(os.listdir(ready)) < world:  # imports done everywhere: start together, as after init_process_group
        time.sleep(0.01)
    t0 = time.perf_counter()
    ds = LlavaDataset(args.data, None, str(Path(args.dir, "tokenizer")), args.template, num_image_tokens=576,
                      model_max_length=2048, rejects_path=Path(args.dir, f"rejects.{rank}.jsonl"), verbose=False)
    t1 = time.perf_counter()
    ds.lengths()
    t2 = time.perf_counter()
    StepLoader(ds, global_batch=128, max_tokens=16384, rank=rank, world_size=world, epochs=1, seed=0,
               image_token_id=ds.image_token_id, num_image_tokens=576)
    t3 = time.perf_counter()
    print(json.dumps({"read": t1 - t0, "lengths": t2 - t1, "plan": t3 - t2, "total": t3 - t0}))


def run_ranks(args, ranks: int) -> dict:
    """Start `ranks` rank processes together; the slowest rank's times."""
    ready = Path(args.dir, "ready")
    shutil.rmtree(ready, ignore_errors=True)
    ready.mkdir()
    env = dict(os.environ, WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
               FASTLLAVA_CACHE=str(Path(args.dir, "cache")))
    if args.source:  # time another fastllava tree (the baseline) instead of the installed one
        env["PYTHONPATH"] = os.path.abspath(args.source) + os.pathsep + env.get("PYTHONPATH", "")
    if args.workers:
        env["FASTLLAVA_LENGTH_WORKERS"] = str(args.workers)
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-worker", "--data", str(args.data), "--dir", args.dir,
                               "--template", args.template], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench_startup: a rank exited with status {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(results, key=lambda r: r["total"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=665_298, help="samples in the generated file (default: the mix's)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="process counts to time")
    p.add_argument("--dir", default="/tmp/fastllava-startup", help="where the file, tokenizer and cache go")
    p.add_argument("--source", help="time the fastllava package under this folder (e.g. a git archive of an "
                                    "older commit, with its _packing extension) instead of the installed one")
    p.add_argument("--workers", type=int, help="FASTLLAVA_LENGTH_WORKERS for the ranks (default: their cores)")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_worker:
        rank_main(args)
        return 0
    if args.entries < 1 or any(r < 1 for r in args.ranks):
        p.error("--entries and --ranks must be >= 1")
    os.makedirs(args.dir, exist_ok=True)
    args.data = Path(args.dir, f"mix{args.entries}.json")
    if not args.data.exists():
        t = time.perf_counter()
        generate_mix(args.data, args.entries)
        print(f"generated {args.data} ({args.data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    if not Path(args.dir, "tokenizer").exists():
        from fastllava.testing import write_llama_tokenizer

        write_llama_tokenizer(Path(args.dir, "tokenizer"))
    out = subprocess.run([sys.executable, "-c", LLAVA_LOADER, str(args.data)], capture_output=True, text=True,
                         check=True).stdout
    rows = [("LLaVA loader (json.load + word counts)", 1, "", json.loads(out)["total"], None)]
    for ranks in args.ranks:
        shutil.rmtree(Path(args.dir, "cache"), ignore_errors=True)
        for state in ("cold", "warm"):
            r = run_ranks(args, ranks)
            rows.append(("fastllava data setup", ranks, state, r["total"], r))
            print(f"{ranks} process(es), {state}: {r}", file=sys.stderr)
    print(f"\n{args.entries} entries, {os.cpu_count()} CPUs, {args.source or 'installed fastllava'}\n")
    print("| what | processes | cache | seconds (slowest rank) | read + validate | lengths | planning |")
    print("|---|---|---|---|---|---|---|")
    for what, ranks, state, total, r in rows:
        parts = " | ".join(f"{r[k]:.1f}" for k in ("read", "lengths", "plan")) if r else " | | "
        print(f"| {what} | {ranks} | {state} | {total:.1f} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
