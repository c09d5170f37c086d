"""What a long run meets in real image folders, injected: decompression bombs, a huge JPEG header, bogus
PNG headers, zero-byte files (each refused and named from its header, in bounded memory and time, on
Pillow and DALI), and a loader worker that dies while it holds a pack (named with its samples)."""

import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_dataset import entries, make
from test_images import _photo, needs_dali

from fastllava.batch import IGNORE_INDEX
from fastllava.data import images
from fastllava.data.loader import StepLoader, WorkerCrashed

BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


# ----------------------------------------------------------------------------- hostile files


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(path, w, h, *, bit_depth=8, color_type=0, ihdr=None):
    """A grayscale PNG of w x h zero pixels, compressed row by row: a few hundred KB whatever its size."""
    row = b"\0" * (1 + (w * bit_depth + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = ihdr if ihdr is not None else struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _jpeg_claiming(path, w, h):
    """A 16 x 16 JPEG whose frame header (SOF0) says w x h."""
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path, "JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{name: path}; 'bombs' are refused for their size, the others for their bytes."""
    d = tmp_path_factory.mktemp("hostile")
    bad_crc = bytearray(_png(d / "bad_crc.png", 64, 64).read_bytes())
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    (d / "bad_crc.png").write_bytes(bytes(bad_crc))
    (d / "zero.png").write_bytes(b"")
    (d / "zero.jpg").write_bytes(b"")
    return {
        # 900 M pixels, 1 bit each: above twice Pillow's own limit, where Pillow raises by itself
        "bomb_30k.png": _png(d / "bomb_30k.png", 30000, 30000, bit_depth=1),
        # 144 M pixels: Pillow only warns below 179 M, and decoding takes ~0.6 GB and over a second
        "bomb_12k.png": _png(d / "bomb_12k.png", 12000, 12000),
        # 96 K pixels on disk, but pad-to-square makes a 12000 x 12000 canvas (~0.5 GB) and a resize of the
        # short side to 336 a 504000 x 336 image
        "strip.png": _png(d / "strip.png", 12000, 8),
        "header_30k.jpg": _jpeg_claiming(d / "header_30k.jpg", 30000, 30000),
        "bad_crc.png": d / "bad_crc.png",
        "zero_width.png": _png(d / "zero_width.png", 0, 64),
        "bad_color_type.png": _png(d / "bad_color_type.png", 64, 64,
                                   ihdr=struct.pack(">IIBBBBB", 64, 64, 8, 9, 0, 0, 0)),
        "zero.png": d / "zero.png",
        "zero.jpg": d / "zero.jpg",
    }


BOMBS = ("bomb_30k.png", "bomb_12k.png", "strip.png", "header_30k.jpg")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.jpg"
    Image.fromarray(_photo(320, 240)).save(path, quality=90)
    return path


# ----------------------------------------------------------------------------- refused and named


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_files_are_refused_and_named(hostile, good, backend):
    for name, path in hostile.items():
        start = time.perf_counter()
        with pytest.raises(images.ImageError) as info:
            images.load_images([good, path, good], "pad", 336, backend=backend)  # named among good neighbours
        assert info.value.path == str(path) and str(path) in str(info.value), name
        if name in BOMBS:
            assert "before decoding" in str(info.value), (name, str(info.value))
        # the header alone decides: milliseconds (decoding a bomb takes over a second here)
        assert time.perf_counter() - start < 0.5, name
    with pytest.raises(images.ImageError, match=r"12000x8 padded to 12000x12000 .* is 144,000,000 pixels"):
        images.load_image(hostile["strip.png"], "pad", backend=backend)
    # stage 1 does not pad, but the shortest side goes to 336 before the crop
    with pytest.raises(images.ImageError, match=r"12000x8 resized to 504000x336 .* is 169,344,000 pixels"):
        images.load_image(hostile["strip.png"], "square", 336, backend=backend)
    assert images.load_image(hostile["strip.png"], "square", 8, backend=backend).shape == (3, 8, 8)


_MEASURE = """
import json, resource, sys, time
from fastllava.data import images
backend, good, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
images.load_images([good], "pad", 336, backend=backend)  # warm: imports, DALI's pipeline, allocator pools
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = {}
for p in paths:
    for mode in ("pad", "square"):
        start = time.perf_counter()
        try:
            images.load_images([p], mode, 336, backend=backend)
        except images.ImageError:
            pass
        seconds[f"{p} {mode}"] = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # ru_maxrss is in KiB on Linux
print(json.dumps({"grown": grown, "seconds": seconds}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's convention")
@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_files_take_bounded_memory(hostile, good, backend):
    """A fresh process's peak memory: decoding the 12k bomb, padding or resizing the strip would add
    ~0.5 GB or more."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, backend, str(good), *map(str, hostile.values())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grown"] < 64 << 20, result
    assert max(result["seconds"].values()) < 0.5, result


def test_dataset_rejects_a_bomb_naming_file_sample_and_image(tmp_path, llama_tok_dir, hostile):
    (tmp_path / "images").mkdir()
    os.symlink(hostile["strip.png"], tmp_path / "images" / "strip.png")
    data = entries()[:1] + [dict(entries()[0], id="strip", image="strip.png")]
    Image.fromarray(_photo(40, 24)).save(tmp_path / "images" / "a.jpg")
    ds = make(tmp_path, llama_tok_dir, data=data, image_loader=None, rejects_path=tmp_path / "rej.jsonl")
    assert ds[0] is not None and ds[1] is None and ds.rejects.counts == {"image": 1}
    (rec,) = [json.loads(x) for x in open(tmp_path / "rej.jsonl")]
    assert rec["file"].endswith("data.json") and rec["index"] == 1 and rec["id"] == "strip"
    assert "strip.png" in rec["detail"] and "MAX_IMAGE_PIXELS" in rec["detail"]
    with pytest.raises(ValueError, match=r"data\.json entry 1, id 'strip'.*strip\.png.*MAX_IMAGE_PIXELS"):
        make(tmp_path, llama_tok_dir, data=data, image_loader=None, strict=True)[1]


@needs_dali
def test_dali_leaves_files_far_larger_than_their_pixels_to_pillow(tmp_path, good, monkeypatch):
    """DALI reads a whole file into memory; a small image padded with megabytes before its end marker goes
    to Pillow, which reads only what it decodes (its output is then bit-identical to Pillow's)."""
    data = good.read_bytes()
    (padded := tmp_path / "padded.jpg").write_bytes(data + b"\0" * (4 << 20) + b"\xff\xd9")
    monkeypatch.setattr(images, "_MAX_METADATA_BYTES", 1 << 20)
    pil = images.load_image(padded, backend="pil")
    assert torch.equal(images.load_images([padded], backend="dali")[0], pil)
    assert not torch.equal(images.load_images([good], backend="dali")[0], images.load_image(good, backend="pil"))


# ----------------------------------------------------------------------------- a dying loader worker

class _Dying:
    """A text-only source whose sample `victim` kills the worker process that loads it (as the OOM killer
    or a segfault in a decoder would) once `go` is set; the main process would load it normally."""

    def __init__(self, n=96):
        self._lengths = np.full(n, 50)
        self.victim = -1
        self.go = multiprocessing.Event()

    def __len__(self):
        return len(self._lengths)

    def lengths(self):
        return self._lengths

    def describe_sample(self, i):
        return f"file.json entry {i}"

    def __getitem__(self, i):
        if i == self.victim and torch.utils.data.get_worker_info() is not None:
            self.go.wait(timeout=60)
            os.kill(os.getpid(), signal.SIGKILL)
        return {"input_ids": torch.full((50,), i), "labels": torch.full((50,), IGNORE_INDEX), "pixel_values": None}


@pytest.mark.parametrize("main_is", ["loading", "training"])
def test_dead_worker_is_named_with_its_samples(main_is):
    """The worker dies while the main process waits for data (the iterator reports it) or while it is in
    a training step (torch's SIGCHLD handler raises there): either way the error names the pack."""
    loader = StepLoader(_Dying(), global_batch=16, max_tokens=200, rank=0, world_size=2, epochs=1, seed=3,
                        image_token_id=-5, num_image_tokens=1, num_workers=2)
    pack = sorted(int(i) for i in loader.plan(1).rank(0)[0])  # step 1's first pack: loaded during step 0
    loader.source.victim = pack[-1]
    in_step = False
    if main_is == "loading":
        loader.source.go.set()
    with pytest.raises(WorkerCrashed) as info:
        for step, _ in loader:
            assert step == 0, "the pack of the dead worker was delivered"
            if main_is == "training":
                in_step, deadline = True, time.monotonic() + 20
                loader.source.go.set()
                while time.monotonic() < deadline:
                    time.sleep(0.01)  # a "step": the worker dies meanwhile
                pytest.fail("no error in the 20 s after the worker died")
    assert in_step == (main_is == "training")
    assert sorted(info.value.samples) == pack
    message = str(info.value)
    assert "step 1, micro-step 1/" in message and f"sample {pack[-1]}: file.json entry {pack[-1]}" in message, message
    assert "DataLoader worker" in message and "data.num_workers=0" in message
