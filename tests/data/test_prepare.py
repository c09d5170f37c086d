"""The downloader of python -m fastllava.data.prepare, and the command on llava-1.5-pretrain, against the
loopback HTTP server of test_prepare_fakes.py (no network).

The server serves small fake files with Range support, without it, as a 404, a 503 once, a connection
dropped midway once, a stall past the client's timeout once, and a stream that always ends early; and a
fake of the Hub repository liuhaotian/LLaVA-Pretrain under the Hub's URL layout, reached through
--source-url (the address $HF_ENDPOINT sets), not huggingface_hub. The other names: test_prepare_names.py.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from test_prepare_fakes import blob as _blob
from test_prepare_fakes import image_bytes, server, zip_of  # noqa: F401 (server: the fixture)

from fastllava.data.prepare.__main__ import main
from fastllava.data.prepare.download import DownloadError, download, download_many

HUB_PREFIX = "datasets/liuhaotian/LLaVA-Pretrain/resolve/main/"

FAST = dict(backoff=0.01, timeout=5.0)


def test_interrupted_download_resumes_from_part(server, tmp_path):
    data = server.files["f.bin"] = _blob()
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:100_000])  # what an interrupted run left
    download(f"{server.url}/range/f.bin", str(dest), what="test", **FAST)
    assert dest.read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()
    assert server.log == [("range/f.bin", "bytes=100000-")]  # only the rest was asked for


def test_server_without_range_restarts_cleanly(server, tmp_path):
    data = server.files["f.bin"] = _blob()
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # appended to, this would corrupt the file
    download(f"{server.url}/norange/f.bin", str(tmp_path / "f.bin"), what="test", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("kind", ["drop", "slow"])
def test_broken_or_stalled_stream_is_retried_and_resumed(server, tmp_path, kind):
    data = server.files["f.bin"] = _blob()
    download(f"{server.url}/{kind}/f.bin", str(tmp_path / "f.bin"), what="test", backoff=0.01, timeout=0.3)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(server.log) == 2
    resumed_from = int(server.log[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(data) // 2  # the second request continued the .part


def test_5xx_is_retried(server, tmp_path):
    data = server.files["f.bin"] = _blob(1000)
    download(f"{server.url}/flaky/f.bin", str(tmp_path / "f.bin"), what="test", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data and server.hits["flaky/f.bin"] == 2


def test_404_names_url_and_is_not_retried(server, tmp_path):
    server.files["f.bin"] = _blob(1000)
    url = f"{server.url}/missing/f.bin"
    with pytest.raises(DownloadError, match=f"{url} \\(llava-1.5-pretrain: f.bin\\): HTTP 404"):
        download(url, str(tmp_path / "f.bin"), what="llava-1.5-pretrain: f.bin", **FAST)
    assert server.hits["missing/f.bin"] == 1
    assert os.listdir(tmp_path) == []


def test_stream_that_always_ends_early_is_never_taken_for_complete(server, tmp_path):
    data = server.files["f.bin"] = _blob(1000)
    url = f"{server.url}/short/f.bin"
    with pytest.raises(DownloadError, match="gave up after 3 attempts.*f.bin.part"):
        download(url, str(tmp_path / "f.bin"), what="test", retries=2, **FAST)
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").read_bytes() == data[:500]  # kept for the next run to resume


@pytest.mark.parametrize("check", ["size", "sha256"])
def test_published_size_or_sha256_mismatch_is_never_renamed(server, tmp_path, check):
    data = server.files["f.bin"] = _blob(1000)
    wrong = {"size": len(data) + 1} if check == "size" else {"sha256": hashlib.sha256(b"other").hexdigest()}
    with pytest.raises(DownloadError, match=f"published {'size' if check == 'size' else 'one'}"):
        download(f"{server.url}/range/f.bin", str(tmp_path / "f.bin"), what="test", **wrong, **FAST)
    assert os.listdir(tmp_path) == []
    right = {"size": len(data)} if check == "size" else {"sha256": hashlib.sha256(data).hexdigest()}
    download(f"{server.url}/range/f.bin", str(tmp_path / "f.bin"), what="test", **right, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_download_many_reports_failures_and_fetches_the_rest(server, tmp_path):
    items = []
    for i in range(20):
        server.files[f"{i}.bin"] = _blob(5000, seed=i)
        kind = "missing" if i == 7 else "drop" if i % 3 == 0 else "range"
        items.append((f"{server.url}/{kind}/{i}.bin", str(tmp_path / f"{i}.bin")))
    failures = download_many(items, what="ocr-vqa", workers=4, **FAST)
    assert [(u, d) for u, d, _ in failures] == [items[7]]
    assert failures[0][2].status == 404 and "HTTP 404" in str(failures[0][2])
    for i in range(20):
        assert (tmp_path / f"{i}.bin").exists() == (i != 7)
        if i != 7:
            assert (tmp_path / f"{i}.bin").read_bytes() == server.files[f"{i}.bin"]


# --- the command line on a fake LLaVA-Pretrain ---------------------------------------------------------

def _pretrain(server, images=("00000/0.jpg", "00000/1.jpg", "00001/2.jpg"), named=None):
    """Serve a fake liuhaotian/LLaVA-Pretrain at the Hub's paths below server.url (--source-url): a json
    naming `named` (default `images`) and images.zip holding `images`."""
    entries = [{"id": str(i), "image": im, "conversations": [
        {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
        {"from": "gpt", "value": f"photo {i}"}]} for i, im in enumerate(named or images)]
    server.files[HUB_PREFIX + "blip_laion_cc_sbu_558k.json"] = json.dumps(entries).encode()
    server.files[HUB_PREFIX + "images.zip"] = zip_of({im: image_bytes(i) for i, im in enumerate(images)})


def _run(server, root, *extra):
    return main(["llava-1.5-pretrain", "--root", str(root), "--source-url", server.url, "--workers", "1",
                 "--backoff", "0.01", *extra])


def test_cli_downloads_unpacks_and_checks(server, tmp_path, capsys):
    _pretrain(server)
    assert _run(server, tmp_path) == 0
    base = tmp_path / "LLaVA-Pretrain"
    assert (base / "blip_laion_cc_sbu_558k.json").read_bytes() == server.files[HUB_PREFIX + "blip_laion_cc_sbu_558k.json"]
    assert (base / "images/00001/2.jpg").read_bytes() == image_bytes(2)  # LLaVA's layout: images/<folder>/<file>
    assert "all images present and decodable" in capsys.readouterr().out
    n = len(server.log)
    assert _run(server, tmp_path) == 0 and len(server.log) == n  # a second run fetches nothing again


def test_cli_zip_with_top_folder_named_like_target_is_not_nested(server, tmp_path):
    _pretrain(server, images=("images/00000/0.jpg",), named=("00000/0.jpg",))
    assert _run(server, tmp_path) == 0
    assert (tmp_path / "LLaVA-Pretrain/images/00000/0.jpg").exists()


def test_cli_missing_image_exits_1_with_the_checker_report(server, tmp_path, capsys):
    _pretrain(server, images=("00000/0.jpg",), named=("00000/0.jpg", "00000/9.jpg"))
    assert _run(server, tmp_path) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "BROKEN" in out


def test_cli_corrupt_zip_is_named(server, tmp_path, capsys):
    _pretrain(server)
    server.files[HUB_PREFIX + "images.zip"] = server.files[HUB_PREFIX + "images.zip"][:-60]  # the central directory cut off
    assert _run(server, tmp_path) == 1
    err = capsys.readouterr().err
    assert "images.zip is not a valid zip archive" in err and "delete it and run again" in err


def test_cli_unreachable_file_names_url_and_exits_1(server, tmp_path, capsys):
    _pretrain(server)
    del server.files[HUB_PREFIX + "blip_laion_cc_sbu_558k.json"]
    assert _run(server, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"{server.url}/{HUB_PREFIX}blip_laion_cc_sbu_558k.json" in err and "HTTP 404" in err
    assert "some files are not in place" in err


def test_cli_unknown_dataset_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["nope", "--root", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown dataset 'nope'; available: llava-1.5-pretrain, llava-1.5-finetune, llava-1.5" in capsys.readouterr().err


def test_cli_as_a_module_help_and_bad_argument(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastllava.data.prepare", *a], capture_output=True, text=True)
    help_ = run("--help")
    assert help_.returncode == 0 and "llava-1.5-pretrain" in help_.stdout
    bad = run("llava-1.5-pretrain", "--root", str(tmp_path), "--retries", "-1")
    assert bad.returncode == 2 and "--retries must be >= 0, got -1" in bad.stderr
