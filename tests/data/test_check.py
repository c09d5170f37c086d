"""python -m fastllava.data.check on a small damaged layout made here: per-folder counts, exit status,
--repair, --usable, and the command line's argument errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import ExifTags, Image

from fastllava.data import check
from fastllava.data.anyres_images import AnyRes, load_anyres
from fastllava.data.images import ImageError, Preprocess, load_image

STATUSES = check.STATUSES


def _photo(path, fmt, size=(40, 30), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    # smooth colour ramps, different per seed: a JPEG copy stays close to the original
    y, x = np.mgrid[: size[1], : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y + 40 * seed) % 256], -1).astype(np.uint8)
    img = Image.fromarray(pixels)
    if fmt == "GIF":
        img = img.convert("P", dither=Image.Dither.NONE)  # dithering noise would not survive a JPEG copy
    img.save(path, fmt)
    return path


def _entry(id_, images):
    images = [images] if isinstance(images, str) else images
    tags = "<image>\n" * len(images)
    entry = {"id": id_, "conversations": [{"from": "human", "value": tags + "What is it?"},
                                          {"from": "gpt", "value": "A thing."}]}
    if images:
        entry["image"] = images[0] if len(images) == 1 else images
    return entry


@pytest.fixture
def layout(tmp_path):
    """A layout with one of each kind of hole; returns (data file, image folder, entries)."""
    root = tmp_path / "images"
    _photo(root / "coco/train2017/a.jpg", "JPEG", seed=1)
    _photo(root / "coco/train2017/b.jpg", "PNG", seed=2)  # a PNG named .jpg: Pillow reads it, as LLaVA does
    _photo(root / "gqa/images/d.png", "PNG", seed=3)
    good = _photo(root / "gqa/images/e.jpg", "JPEG", size=(64, 64), seed=4).read_bytes()
    (root / "gqa/images/e.jpg").write_bytes(good[:-200])  # truncated in the scan: the header reads
    (root / "gqa/images/f.jpg").write_bytes(b"")  # zero bytes
    _photo(root / "ocr_vqa/images/g.gif", "GIF", seed=5)  # the data names g.jpg
    _photo(root / "ocr_vqa/images/h.png", "PNG", seed=6)  # the data names h.jpg
    entries = [
        _entry("a", "coco/train2017/a.jpg"),
        _entry("b", "coco/train2017/b.jpg"),
        _entry("c", "coco/train2017/c.jpg"),  # missing
        _entry("d", "gqa/images/d.png"),
        _entry("e", "gqa/images/e.jpg"),
        _entry("f", "gqa/images/f.jpg"),
        _entry("g", "ocr_vqa/images/g.jpg"),
        _entry("h", "ocr_vqa/images/h.jpg"),
        _entry("text", []),
        _entry("a+c", ["coco/train2017/a.jpg", "coco/train2017/c.jpg"]),  # c counted once per folder
        _entry("a+g", ["coco/train2017/a.jpg", "ocr_vqa/images/g.jpg"]),
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    return data, root, entries


BROKEN = {"coco/train2017": {"present": 2, "missing": 1},
          "gqa/images": {"present": 1, "corrupt": 2},
          "ocr_vqa/images": {"other_ext": 2}}


def _counts(stdout: str) -> dict:
    """{source: {status: n}} (non-zero only) from the report's table; the images column must be their sum."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["source", "images"])
    assert lines[start].split()[2:] == list(STATUSES)
    out = {}
    for line in lines[start + 1 :]:
        name, total, *nums = line.split()
        assert sum(map(int, nums)) == int(total), line
        out[name] = {s: int(n) for s, n in zip(STATUSES, nums) if int(n)}
        if name == "total":
            return out
    raise AssertionError(f"no total row in:\n{stdout}")


def _run(capsys, *argv):
    status = check.main([str(a) for a in argv])
    return status, capsys.readouterr().out


def test_cli_reports_each_hole_per_folder(layout):
    """The real command, in a pool of two processes: exact counts per folder and status 1."""
    data, root, _ = layout
    proc = subprocess.run([sys.executable, "-m", "fastllava.data.check", str(data), "--image-folder", str(root),
                           "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    counts = _counts(proc.stdout)
    assert counts.pop("total") == {"present": 3, "missing": 1, "corrupt": 2, "other_ext": 2}
    assert counts == BROKEN
    assert "--repair" in proc.stdout and "gqa/images/f.jpg" in proc.stdout
    assert "gqa/images/e.jpg: corrupt or truncated" in proc.stdout


def test_repair_writes_jpegs_and_a_recheck_passes_them(layout, capsys):
    data, root, _ = layout
    gif = np.asarray(Image.open(root / "ocr_vqa/images/g.gif").convert("RGB"), dtype=np.float64)
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--repair")
    assert status == 1  # missing and corrupt images remain
    assert _counts(out)["ocr_vqa/images"] == {"repaired": 2}
    for name in ("g", "h"):
        with Image.open(root / f"ocr_vqa/images/{name}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    jpeg = np.asarray(Image.open(root / "ocr_vqa/images/g.jpg"), dtype=np.float64)
    other = np.asarray(Image.open(root / "coco/train2017/a.jpg"), dtype=np.float64)
    # the same picture, to JPEG's loss on the palette's hard edges (5.4 levels), not another one
    assert np.abs(jpeg - gif).mean() < 8 < np.abs(other - gif).mean()
    assert not list(root.rglob("*.tmp"))
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1)
    assert _counts(out)["ocr_vqa/images"] == {"present": 2}
    assert "corrupt" in out and status == 1


def test_repair_writes_the_format_the_name_says(tmp_path, capsys):
    root = tmp_path / "images"
    _photo(root / "ocr_vqa/k.jpg", "JPEG")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_entry("k", "ocr_vqa/k.png")]))
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--repair")
    assert status == 0 and _counts(out)["total"] == {"repaired": 1}
    with Image.open(root / "ocr_vqa/k.png") as img:
        assert img.format == "PNG"


def test_usable_writes_exactly_the_good_entries(layout, tmp_path, capsys):
    data, root, entries = layout
    out_file = tmp_path / "usable.json"
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--usable", out_file)
    assert status == 1
    by_id = {e["id"]: e for e in entries}
    assert json.loads(out_file.read_text()) == [by_id[i] for i in ("a", "b", "d", "text")]
    assert "dropped 7" in out
    assert "dropped 2 for missing images in coco/train2017" in out
    assert "dropped 2 for corrupt images in gqa/images" in out
    assert "dropped 3 for other_ext images in ocr_vqa/images" in out
    _run(capsys, data, "--image-folder", root, "--workers", 1, "--usable", out_file, "--repair")
    assert [e["id"] for e in json.loads(out_file.read_text())] == ["a", "b", "d", "g", "h", "text", "a+g"]


def test_broken_lists_every_image_that_is_not_good(layout, tmp_path, capsys):
    data, root, _ = layout
    out_file = tmp_path / "broken.jsonl"
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--broken", out_file)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    got = sorted((r["image"], r["source"], r["status"]) for r in rows)
    assert got == [("coco/train2017/c.jpg", "coco/train2017", "missing"), ("gqa/images/e.jpg", "gqa/images", "corrupt"),
                   ("gqa/images/f.jpg", "gqa/images", "corrupt"),
                   ("ocr_vqa/images/g.jpg", "ocr_vqa/images", "other_ext"),
                   ("ocr_vqa/images/h.jpg", "ocr_vqa/images", "other_ext")]
    assert all(r["detail"] for r in rows) and "listed 5 images" in out and status == 1


def test_structural_rejects_are_broken_and_left_out(tmp_path, capsys):
    root = tmp_path / "images"
    _photo(root / "coco/a.jpg", "JPEG")
    bad = _entry("bad", "coco/a.jpg")
    bad["conversations"][0]["value"] = "no tag"
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in (_entry("ok", "coco/a.jpg"), bad)))
    out_file = tmp_path / "usable.json"
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--usable", out_file)
    assert status == 1 and "1 entries rejected for their structure" in out and "id 'bad': image_tags" in out
    assert [e["id"] for e in json.loads(out_file.read_text())] == ["ok"]


def test_clean_layout_exits_0(tmp_path, capsys):
    root = tmp_path / "images"
    entries = [_entry(str(i), f"coco/train2017/{i}.jpg") for i in range(5)] + [_entry("t", [])]
    for i in range(5):
        _photo(root / f"coco/train2017/{i}.jpg", "JPEG", seed=i)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1)
    assert status == 0
    assert _counts(out) == {"coco/train2017": {"present": 5}, "total": {"present": 5}}


def test_decompression_bomb_counts_as_corrupt(tmp_path, monkeypatch):
    # images.py's limit is read at every call: a 40x30 image is a "bomb" under a limit of 100 pixels
    monkeypatch.setattr("fastllava.data.images.MAX_IMAGE_PIXELS", 100)
    path = _photo(tmp_path / "x.jpg", "JPEG")
    status, detail = check.check_image(str(path))
    assert status == "corrupt" and "decompression bomb" in detail



def test_anyres_mode_checks_as_the_anyres_loader_decodes(tmp_path, capsys):
    """A 1 x 10000 strip: pad's 10000 x 10000 canvas and square's 336 x 3,360,000 resize are above
    MAX_IMAGE_PIXELS, so those loaders refuse it, while AnyRes tiles it: only --mode anyres counts it present."""
    root = tmp_path / "images"
    strip = _photo(root / "coco/strip.png", "PNG", size=(10000, 1))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_entry("s", "coco/strip.png")]))
    with pytest.raises(ImageError):
        load_image(strip, mode="pad")
    assert load_anyres(strip, AnyRes(Preprocess())).shape[1:] == (3, 336, 336)
    for mode, want in (("pad", "corrupt"), ("square", "corrupt"), ("anyres", "present")):
        status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--mode", mode)
        assert _counts(out)["total"] == {want: 1} and status == (want != "present"), (mode, out)


def test_anyres_mode_finds_what_the_other_modes_find(layout, capsys):
    data, root, _ = layout
    status, out = _run(capsys, data, "--image-folder", root, "--workers", 1, "--mode", "anyres")
    counts = _counts(out)
    assert counts.pop("total") == {"present": 3, "missing": 1, "corrupt": 2, "other_ext": 2} and status == 1
    assert counts == BROKEN


def test_anyres_mode_compares_the_header_size_with_the_decoded_one(tmp_path, monkeypatch):
    """A JPEG turned by its EXIF orientation is the same size both ways (AnyRes counts its tokens from the
    header); a header that disagreed with the decode would give a count that does not match the tiles."""
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # a quarter turn: 40x30 stored, 30x40 shown
    Image.open(_photo(tmp_path / "src.png", "PNG", size=(40, 30))).save(path, "JPEG", exif=exif)
    assert check.check_image(str(path), "anyres") == ("present", "")
    monkeypatch.setattr(check, "image_size", lambda p: (30, 40))  # the stored size, not the decoded one
    status, detail = check.check_image(str(path), "anyres")
    assert status == "corrupt" and "header gives 40x30" in detail and "decodes to 30x40" in detail

def test_source_of():
    assert check.source_of("coco/train2017/1.jpg") == "coco/train2017"
    assert check.source_of("vg/VG_100K_2/sub/1.jpg") == "vg/VG_100K_2"
    assert check.source_of("00000/1.jpg") == "00000"
    assert check.source_of("1.jpg") == "."


@pytest.mark.parametrize("argv, names", [
    (["--workers", "0"], "--workers"),
    (["--image-folder", "/nonexistent/images"], "--image-folder"),
    (["--mode", "crop"], "--mode"),
    (["--data-typo"], "--data-typo"),
])
def test_bad_arguments_exit_2_naming_them(layout, capsys, argv, names):
    data, root, _ = layout
    base = [str(data), "--image-folder", str(root)]
    with pytest.raises(SystemExit) as e:
        check.main(base + argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--usable", "--broken"])
def test_outputs_refuse_to_overwrite_the_data(layout, capsys, flag):
    data, root, _ = layout
    before = data.read_text()
    with pytest.raises(SystemExit) as e:
        check.main([str(data), "--image-folder", str(root), flag, str(data)])
    assert e.value.code == 2 and flag in capsys.readouterr().err and data.read_text() == before


def test_missing_data_file_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        check.main([str(tmp_path / "nope.json"), "--image-folder", str(tmp_path)])
    assert e.value.code == 2 and "nope.json" in capsys.readouterr().err


def test_help():
    proc = subprocess.run([sys.executable, "-m", "fastllava.data.check", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "--repair" in proc.stdout and "--usable" in proc.stdout
