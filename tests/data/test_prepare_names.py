"""python -m fastllava.data.prepare on every dataset name, against fakes of every source served on loopback
(test_prepare_fakes.py) and reached through --mirror, as a user with a mirror reaches a copy: the layout
each name must produce (checked by the layout checker the command runs), a second run that fetches
nothing, a resumed archive, a 404, a corrupt archive, a trickling source, and OCR-VQA from its per-image
URLs with images gone upstream.
"""

import io
import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
from PIL import Image
from test_prepare_fakes import (MIX_IMAGES, PRETRAIN_IMAGES, blob, image_bytes, key_of, mirror_args, real_url,
                                serve_fakes, server, zip_of)  # noqa: F401 (server: the fixture)

from fastllava.data.prepare.__main__ import main
from fastllava.data.prepare.sources import DATASETS
from fastllava.data.prepare.unpack import top_to_drop

COCO = "images.cocodataset.org/zips/train2017.zip"
GQA = "downloads.cs.stanford.edu/nlp/data/gqa/images.zip"
TEXTVQA = "dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"
OCR_MIRROR = "huggingface.co/datasets/qnguyen3/ocr_vqa/resolve/main/ocr_vqa.zip"
MIX = "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_v1_5_mix665k.json"


def _run(server, root, name, *extra):
    return main([name, "--root", str(root), *mirror_args(server, extra_hosts=("ecx.images-amazon.com", "ocr.example")),
                 "--workers", "1", "--backoff", "0.01", "--timeout", "5", *extra])


# What each name must leave in the layout (besides the checker passing on it), relative to the root.
LAYOUT = {
    "llava-1.5-pretrain": ["LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                           *(f"LLaVA-Pretrain/images/{im}" for im in PRETRAIN_IMAGES)],
    "llava-1.5-finetune": ["llava_v1_5_mix665k.json", *(im for im in MIX_IMAGES if im)],
    "llava-instruct-158k": ["LLaVA-Instruct-150K/llava_instruct_158k.json", "coco/train2017/000000000025.jpg"],
    "cc3m-595k": ["LLaVA-CC3M-Pretrain-595K/chat.json", "LLaVA-CC3M-Pretrain-595K/images/GCC_train_000000000.jpg"],
    "scienceqa": ["scienceqa/llava_train_QCM-LEA.json", "scienceqa/llava_test_CQM-A.json",
                  "scienceqa/images/train/1/image.png", "scienceqa/images/test/3/image.png"],
}
LAYOUT["llava-1.5"] = LAYOUT["llava-1.5-pretrain"] + LAYOUT["llava-1.5-finetune"]


@pytest.mark.parametrize("name", list(DATASETS))
def test_name_downloads_unpacks_checks_and_resumes_nothing(server, tmp_path, capsys, name):
    assert set(LAYOUT) == set(DATASETS)
    serve_fakes(server)
    assert _run(server, tmp_path, name) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    for path in LAYOUT[name]:
        assert (tmp_path / path).is_file(), path
    assert out.count("all images present and decodable") == len(DATASETS[name].checks)
    fetched = {p for p, _ in server.log}
    assert fetched == {key_of(real_url(f)) for f in DATASETS[name].files}  # each source once, nothing else
    n = len(server.log)
    assert _run(server, tmp_path, name) == 0 and len(server.log) == n  # a second run fetches nothing
    assert "unpacked by an earlier run" in capsys.readouterr().out


def test_finetune_layout_is_llavas_and_ocr_vqa_gif_is_repaired_as_jpeg(server, tmp_path, capsys):
    serve_fakes(server)
    assert _run(server, tmp_path, "llava-1.5-finetune") == 0
    # Each archive's top folder is not repeated: coco/train2017/<file>, not coco/train2017/train2017/<file>.
    assert sorted(os.listdir(tmp_path / "coco/train2017")) == [".train2017.zip.unpacked", "000000000009.jpg",
                                                                "000000000025.jpg"]
    # The mirror's top folder (ocr_vqa/) is dropped; its 1001.gif is written as the 1001.jpg the json names.
    with Image.open(tmp_path / "ocr_vqa/images/1001.jpg") as im:
        assert im.format == "JPEG"
    assert "repaired 1 image(s)" in capsys.readouterr().out


def test_scienceqa_is_converted_for_the_recipe_and_the_eval_task(server, tmp_path):
    serve_fakes(server)
    assert _run(server, tmp_path, "scienceqa") == 0
    sqa = tmp_path / "scienceqa"
    train = json.loads((sqa / "llava_train_QCM-LEA.json").read_text())
    assert [(e["id"], e["image"]) for e in train] == [("1", "1/image.png")]  # relative to images/train
    assert [e["id"] for e in json.loads((sqa / "llava_val_QCM-LEA.json").read_text())] == ["2"]
    assert (sqa / "problems.json").is_file() and (sqa / "images/test/3/image.png").is_file()


def test_interrupted_archive_resumes_byte_identical(server, tmp_path):
    serve_fakes(server)
    whole = server.files[COCO]
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco/train2017.zip.part").write_bytes(whole[: len(whole) // 2])  # what an interrupted run left
    assert _run(server, tmp_path, "llava-instruct-158k") == 0
    assert (tmp_path / "coco/train2017.zip").read_bytes() == whole
    assert [r for p, r in server.log if p == COCO] == [f"bytes={len(whole) // 2}-"]  # only the rest was asked for


def test_missing_source_is_named_with_what_to_do_and_the_rest_is_fetched(server, tmp_path, capsys):
    serve_fakes(server)
    gqa = server.files.pop(GQA)
    assert _run(server, tmp_path, "llava-1.5-finetune") == 1
    err = capsys.readouterr().err
    assert f"{server.url}/{GQA} (llava-1.5-finetune: gqa/images): HTTP 404" in err
    assert "--mirror downloads.cs.stanford.edu=URL" in err and "run the same command again to resume" in err
    assert (tmp_path / "vg/VG_100K_2/2.jpg").is_file()  # the sources after it were still fetched
    server.files[GQA] = gqa
    n = len(server.log)
    assert _run(server, tmp_path, "llava-1.5-finetune") == 0
    assert {p for p, _ in server.log[n:]} == {GQA}  # the second run fetched only what was missing


def test_unreachable_host_is_named_with_what_to_do(server, tmp_path, capsys):
    serve_fakes(server)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert _run(server, tmp_path, "llava-instruct-158k", "--retries", "1", "--mirror",
                f"images.cocodataset.org={closed}") == 1
    err = capsys.readouterr().err
    assert f"{closed}/zips/train2017.zip (llava-instruct-158k: coco/train2017): cannot connect" in err
    assert "no server answered: if images.cocodataset.org is not reachable from here" in err
    assert "--mirror images.cocodataset.org=URL at a copy (one is given: check it)" in err


@pytest.mark.parametrize("ocr_urls", [False, True])
def test_malformed_json_is_named_and_exits_1(server, tmp_path, capsys, ocr_urls):
    serve_fakes(server)
    server.files[MIX] = b'[{"id": "0", '  # whole as the server sent it, yet not JSON
    server.files["ocr.example/dataset.json"] = b"{}"
    extra = ("--ocr-vqa-urls", "http://ocr.example/dataset.json") if ocr_urls else ()
    assert _run(server, tmp_path, "llava-1.5-finetune", *extra) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "llava_v1_5_mix665k.json") in err and "JSON" in err


def test_corrupt_archive_is_named(server, tmp_path, capsys):
    serve_fakes(server)
    server.files[TEXTVQA] = server.files[TEXTVQA][:-60]  # the central directory cut off
    assert _run(server, tmp_path, "llava-1.5-finetune") == 1
    err = capsys.readouterr().err
    assert "textvqa/train_val_images.zip is not a valid zip archive" in err and "delete it and run again" in err


def test_trickling_sources_complete_at_once_with_progress_lines(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_PROGRESS_INTERVAL", "0.05")
    serve_fakes(server)
    for key, top in ((COCO, "train2017"), (GQA, "images")):
        with zipfile.ZipFile(io.BytesIO(server.files[key])) as z:
            members = {n: z.read(n) for n in z.namelist()}
        server.files[key] = zip_of({**members, f"{top}/more.bin": blob(100_000)})  # 50 pieces: 1 s
        server.kinds[key] = "trickle"
    assert _run(server, tmp_path, "llava-1.5-finetune", "--timeout", "1", "--jobs", "2") == 0
    (coco,), (gqa,) = server.spans[COCO], server.spans[GQA]
    assert min(coco[1], gqa[1]) - max(coco[0], gqa[0]) > 0.5  # the two 1 s answers ran side by side
    lines = capsys.readouterr().out.splitlines()
    for label in ("coco/train2017:", "gqa/images:"):
        mine = [line for line in lines if line.startswith(label)]
        assert len(mine) >= 3 and "100%" in mine[-1]  # a plain line every interval, not one bar frame


def test_ocr_vqa_from_its_urls_counts_images_gone_upstream(server, tmp_path, capsys):
    serve_fakes(server)
    images = [*MIX_IMAGES, "ocr_vqa/images/1002.jpg", "ocr_vqa/images/1003.jpg"]
    server.files[MIX] = json.dumps([{"id": str(i), "image": im, "conversations": [
        {"from": "human", "value": "<image>\nWho wrote it?"}, {"from": "gpt", "value": "me"}]}
        for i, im in enumerate(images) if im]).encode()
    amazon = "ecx.images-amazon.com/images/I"
    server.files[f"{amazon}/a.jpg"] = image_bytes(4)
    server.files[f"{amazon}/b.gif"] = image_bytes(5, "GIF")  # 1002's image is gone: no file, a 404
    urls = {i: {"imageURL": f"http://{amazon}/{f}", "title": "t"} for i, f in zip(("1000", "1001", "1002"),
                                                                                  ("a.jpg", "b.gif", "c.jpg"))}
    server.files["ocr.example/dataset.json"] = json.dumps(urls).encode()  # 1003 is not in the list
    assert _run(server, tmp_path, "llava-1.5-finetune", "--ocr-vqa-urls", "http://ocr.example/dataset.json") == 1
    out, err = capsys.readouterr()
    assert OCR_MIRROR not in {p for p, _ in server.log}  # the per-image URLs replace the mirror
    assert "ocr_vqa/images: 2 of the 4 images llava_v1_5_mix665k.json names are not in place" in err
    assert "1 no longer exist upstream (HTTP 403/404/410)" in err and "1 are not in http://ocr.example" in err
    assert "--usable usable.json" in err
    assert (tmp_path / "ocr_vqa/images/1000.jpg").read_bytes() == image_bytes(4)
    assert (tmp_path / "ocr_vqa/images/1001.jpg").is_file()  # the .gif repaired as the .jpg the json names
    assert "2 missing image(s)" in out  # the checker's report
    n = len(server.log)
    assert _run(server, tmp_path, "llava-1.5-finetune", "--ocr-vqa-urls", "http://ocr.example/dataset.json") == 1
    assert {p for p, _ in server.log[n:]} == {f"{amazon}/c.jpg"}  # only the failed image is asked again


def test_delete_archives_keeps_the_unpacked_layout(server, tmp_path):
    serve_fakes(server)
    assert _run(server, tmp_path, "cc3m-595k", "--delete-archives") == 0
    assert not (tmp_path / "LLaVA-CC3M-Pretrain-595K/images.zip").exists()
    n = len(server.log)
    assert _run(server, tmp_path, "cc3m-595k") == 0 and len(server.log) == n  # the marker says it is unpacked


def test_hf_token_goes_to_the_hub_only_and_revisions_pin_each_repo(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    serve_fakes(server)
    cc3m = "huggingface.co/datasets/liuhaotian/LLaVA-CC3M-Pretrain-595K/resolve/"
    for f in ("chat.json", "images.zip"):
        server.files[f"{cc3m}v1/{f}"] = server.files.pop(f"{cc3m}main/{f}")
    assert _run(server, tmp_path, "llava-1.5") == 0
    assert _run(server, tmp_path, "cc3m-595k", "--revision", "liuhaotian/LLaVA-CC3M-Pretrain-595K=v1") == 0
    assert _run(server, tmp_path / "other", "cc3m-595k", "--revision", "v1") == 0  # a bare REV: every repo
    assert {p: a for p, a in server.auth.items() if a} == {p: "Bearer hf_secret" for p in server.auth
                                                          if p.startswith("huggingface.co/")}


@pytest.mark.parametrize("names, into, top, drop", [
    (["train2017/", "train2017/1.jpg"], "coco/train2017", None, "train2017/"),
    (["00000/0.jpg", "00000/1.jpg"], "LLaVA-Pretrain/images", None, ""),  # the json names 00000/
    (["images/00000/0.jpg", "images/00001/1.jpg"], "LLaVA-Pretrain/images", None, "images/"),
    (["ocr_vqa/images/1.jpg"], "ocr_vqa/images", None, "ocr_vqa/images/"),
    (["ocr_vqa/1.jpg", "ocr_vqa/2.gif"], "ocr_vqa/images", None, ""),
    (["ocr_vqa/1.jpg", "ocr_vqa/2.gif"], "ocr_vqa/images", "*", "ocr_vqa/"),
    (["1.jpg"], "ocr_vqa/images", "*", ""),
    (["__MACOSX/ocr_vqa/._1.jpg", "ocr_vqa/1.jpg"], "ocr_vqa/images", "*", "ocr_vqa/"),
    (["val/"], "scienceqa/images/val", None, "val/"),
])
def test_top_folder_to_drop(names, into, top, drop):
    assert top_to_drop(names, into, top) == drop


@pytest.mark.parametrize("args, says", [
    (["--mirror", "images.cocodataset.org"], "--mirror 'images.cocodataset.org': expected KEY=VALUE"),
    (["--mirror", "images.cocodataset.org=ftp://x"], "expected HOST=http(s)://"),
    (["--revision", "org/other=v1"], "reads no Hub repository org/other"),
    (["--ocr-vqa-urls", "dataset.json"], "--ocr-vqa-urls: cc3m-595k has no OCR-VQA images"),
    (["--download-workers", "0"], "--download-workers must be > 0, got 0"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(["cc3m-595k", "--root", str(tmp_path), *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_help_lists_every_name_and_host():
    out = subprocess.run([sys.executable, "-m", "fastllava.data.prepare", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in DATASETS:
        assert name in out
    assert "images.cocodataset.org" in out and "scienceqa.s3.us-west-1.amazonaws.com" in out
