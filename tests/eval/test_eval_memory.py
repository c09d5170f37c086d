"""Evaluation in bounded memory: the peak memory of `python -m fastllava.eval --model` does not grow with the
number of questions, from LLaVA's layout and from Hub parquet rows. (Prompts are built a group at a time,
shortly before the generator needs them, and dropped with their group; a Hub row's image stays in its parquet
file until its prompt is built.)

Measured in a fresh process: the peak resident set (VmHWM, reset through /proc/self/clear_refs before each
run) of answering N and then 4N questions with large images; without the bound the 3N extra questions add
their pixels (1.29 MiB each at LLaVA-1.5's 336 px) and, from the Hub, their decoded photos (2.25 MiB each)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from layout_bench import make_seed
from PIL import Image

from hub_parquet import write_shards
from test_hub_bench import seed_parquet
from test_hub_tasks import POPE_SCHEMA

from fastllava.eval import hub
from fastllava.eval.hub import read_rows
from fastllava.eval.run import main
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.pope import POPE
from fastllava.eval.tasks.seed import SEED
from fastllava.testing import write_tiny_llava

N = 32
SIDE = 336  # LLaVA-1.5's tower input
PIXELS_MIB = 3 * SIDE * SIDE * 4 / 2**20  # one prompt's float32 pixels
PHOTO = (1024, 768)  # decoded 2.25 MiB; a PNG of one colour is a few KB, so the files stay small
BATCH = 4  # --max-batch-size: the generator's slots, which set how many prompts are prepared ahead

# Runs in a fresh interpreter, so that nothing another test allocated hides (or adds to) the growth; large
# blocks are mmapped (MALLOC_MMAP_THRESHOLD_ below) so that freed memory leaves the resident set at once.
SCRIPT = r"""
import json, sys
from fastllava.eval.run import main

def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

model, batch, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
growth = {}
for name, data, out in runs:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the resident set now
    start = peak_kb()
    args = ["--model", model, "--task", "pope", "--data", data, "--output", out, "--max-new-tokens", "1",
            "--max-batch-size", batch]
    assert main(args) == 0
    growth[name] = (peak_kb() - start) / 1024
print(json.dumps(growth))
"""


def pope_layout(root, n):
    """LLaVA's pope/ layout with n questions, all on one large photo (no label files: answered, not scored)."""
    d = root / "pope"
    (d / "val2014").mkdir(parents=True)
    Image.new("RGB", PHOTO, (120, 90, 60)).save(d / "val2014" / "photo.png")
    with open(d / "llava_pope_test.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"question_id": i + 1, "image": "photo.png", "category": "adversarial",
                                "text": f"Is there a cat number {i} in the image?"}) + "\n")
    return root


def pope_hub(root, n):
    """lmms-lab/POPE's rows for n questions, each row holding its own copy of a large photo (as VQAv2's rows do)."""
    (root / "layout").mkdir(parents=True)
    Image.new("RGB", PHOTO, (60, 90, 120)).save(root / "layout" / "photo.png")
    photo = (root / "layout" / "photo.png").read_bytes()
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a dog number {i} in the image?",
             "answer": "yes", "image_source": "photo", "image": {"bytes": photo, "path": None},
             "category": "adversarial"} for i in range(n)]
    write_shards(root / "hub" / "data", rows, POPE_SCHEMA)
    return root / "hub"


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_memory_does_not_grow_with_the_question_count(tmp_path):
    model = write_tiny_llava(tmp_path / "model", vision={"image_size": SIDE, "patch_size": 84})
    runs = [("warm layout", pope_layout(tmp_path / "l1", 2)), ("warm hub", pope_hub(tmp_path / "h1", 2))]
    for n in (N, 4 * N):
        runs += [(f"layout {n}", pope_layout(tmp_path / f"l{n}", n)), (f"hub {n}", pope_hub(tmp_path / f"h{n}", n))]
    runs = [(name, str(data), str(tmp_path / "out" / name)) for name, data in runs]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(BATCH), json.dumps(runs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.splitlines()[-1])
    # Unbounded, the 3N extra questions add 3N * 1.29 = 124 MiB from the layout (their pixels) and 3N * (1.29 +
    # 2.25) = 340 MiB from the Hub (pixels and decoded photos): 124 and 414 MiB measured before the bound (CPU,
    # 2026-12-06). Bounded they add their questions and answers only: 0-5 MiB measured, under a quarter of
    # their pixels.
    for path in ("layout", "hub"):
        extra = growth[f"{path} {4 * N}"] - growth[f"{path} {N}"]
        assert extra < 3 * N * PIXELS_MIB / 4, (path, growth)


def pope_rows(photos):
    """lmms-lab/POPE rows, question k on image cell photos[k] (bytes, or None for a null cell)."""
    return [{"id": str(k), "question_id": str(k + 1), "question": f"Is there a cat number {k} in the image?",
             "answer": "no", "image_source": str(k), "image": None if p is None else {"bytes": p, "path": None},
             "category": "adversarial"} for k, p in enumerate(photos)]


def png(colour, size):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hub_images_open_from_their_row_groups_and_bad_ones_are_named(tmp_path, monkeypatch):
    """Each question's image is its own row's, opened in any order through row groups of two rows and a cache
    that keeps one; bytes that do not decode are named (file, row) when opened, not when the rows are read; a
    null cell is named when the questions are made."""
    monkeypatch.setattr(hub, "_ROW_GROUPS", hub._RowGroups(1))
    photos = [png((30 * k, 200 - 20 * k, 7 * k), (5 + k, 4)) for k in range(7)]
    photos[5] = b"not an image"
    file = tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pope_rows(photos), schema=POPE_SCHEMA), file, row_group_size=2)
    questions = POPE().load_hub(read_rows(tmp_path / "POPE", POPE.hub))
    for k in (3, 0, 6, 1, 4, 2, 3):
        with Image.open(io.BytesIO(photos[k])) as expected:
            assert np.array_equal(np.asarray(questions[k].images[0].open()), np.asarray(expected.convert("RGB")))
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001.parquet: row 5: image does not decode"):
        questions[5].images[0].open()
    photos[5] = None
    pq.write_table(pa.Table.from_pylist(pope_rows(photos), schema=POPE_SCHEMA), file, row_group_size=2)
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001.parquet: row 5: expected an image cell .*got null"):
        POPE().load_hub(read_rows(tmp_path / "POPE", POPE.hub))


def test_a_bad_hub_image_stops_the_run_with_its_file_and_row(llava_dir, tmp_path, capsys):
    photos = [png((9, 9, 9), (6, 6))] * 3 + [b"\x89PNG truncated"]
    write_shards(tmp_path / "POPE" / "data", pope_rows(photos), POPE_SCHEMA, shards=1)
    assert main(["--model", str(llava_dir), "--task", "pope", "--data", str(tmp_path / "POPE"),
                 "--output", str(tmp_path / "out"), "--max-new-tokens", "1", "--max-batch-size", "1"]) == 1
    assert "test-00000-of-00001.parquet: row 3: image does not decode" in capsys.readouterr().err


def test_seed_rows_decode_only_the_asked_images(tmp_path, monkeypatch):
    """Reading SEED-Bench's rows and making its questions decodes nothing; building the prompts decodes each
    image question's image, never a skipped video row's frames."""
    decoded, decode = [], hub.decode_image

    def spy(cell, file, row):
        decoded.append((file, row))
        return decode(cell, file, row)

    monkeypatch.setattr(hub, "decode_image", spy)
    rows = read_rows(seed_parquet(make_seed(tmp_path / "l"), tmp_path / "hub"), SEED.hub)
    questions = SEED().load_hub(rows)
    assert decoded == []
    for q in questions:
        q.images[0].open()
    videos = [(file, i) for file, i, row in rows if row["data_type"] != "image"]
    assert videos and decoded == [(q.images[0].file, q.images[0].row) for q in questions]
    assert not set(decoded) & set(videos)
