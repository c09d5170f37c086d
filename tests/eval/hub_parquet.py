"""Helpers of the Hub parquet tests (tests/eval/test_hub_*.py): parquet shards written as the lmms-lab
repositories hold them, huggingface_hub's cache layout, and the comparisons with LLaVA's layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fastllava.eval.run import main

# The `datasets` Image feature's storage: what an image column of a Hub parquet file holds.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_shards(path, rows, schema, shards=2):
    """rows as parquet shards data/test-0000k-of-0000n.parquet, the layout of the lmms-lab repositories."""
    path.mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // shards)
    for k in range(shards):
        table = pa.Table.from_pylist(rows[k * step:(k + 1) * step], schema=schema)
        pq.write_table(table, path / f"test-{k:05d}-of-{shards:05d}.parquet")


def same_questions(hub, layout):
    assert [(q.question_id, q.text, q.record, q.truth) for q in hub] == \
           [(q.question_id, q.text, q.record, q.truth) for q in layout]
    for h, lay in zip(hub, layout):
        assert len(h.images) == len(lay.images) == 1
        with Image.open(lay.images[0]) as im:
            assert np.array_equal(np.asarray(h.images[0].open()), np.asarray(im.convert("RGB")))


def score_both(tmp_path, task, layout, hub_dir, answers):
    """The scores `--answers` gives for the same answers file from LLaVA's layout and from the Hub rows."""
    out = []
    for name, data in (("layout", layout), ("hub", hub_dir)):
        assert main(["--task", task, "--data", str(data), "--answers", str(answers),
                     "--output", str(tmp_path / name)]) == 0
        out.append(json.loads((tmp_path / name / "scores.json").read_text())["scores"])
    return out


def hub_cache(cache, repo, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """`files` ({path in repo: bytes}) as huggingface_hub's cache holds a downloaded snapshot of `repo`."""
    base = cache / f"datasets--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        path = base / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def offline_cache(monkeypatch, cache):
    """huggingface_hub reads `cache` only, offline (its constants are read at import, so set there too)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
