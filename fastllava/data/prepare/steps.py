"""The steps of `prepare` after the files are in place: OCR-VQA's images from its per-image URLs (instead of
the mirror archive), and ScienceQA's release converted into LLaVA's json.

Each returns the problems it leaves as lines for the report (empty when all is well), never raising for
images or problems that are missing: those are counted and named, and the run exits 1 on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from .. import scienceqa
from ..check import OTHER_EXTENSIONS
from .download import DownloadError, download, download_many
from .sources import OCR_VQA_FOLDER, mirrored

# Statuses that say an image is gone from its host, not that the host is busy: asking again will not help.
GONE = (403, 404, 410)


def _ocr_vqa_list(ref: str, root: str, mirrors: dict[str, str], **kw) -> dict:
    """OCR-VQA's dataset.json ({image id: {"imageURL": ...}, ...}) from a path, or downloaded from a URL into
    <root>/ocr_vqa/dataset.json; ValueError naming the file and what was expected."""
    path = ref
    if urlsplit(ref).scheme in ("http", "https"):
        path = download(mirrored(ref, mirrors), os.path.join(root, "ocr_vqa", "dataset.json"),
                        what="OCR-VQA's URL list", **kw)
    try:
        with open(path, encoding="utf-8") as f:
            urls = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--ocr-vqa-urls {ref}: {e}; expected OCR-VQA's dataset.json") from None
    if not isinstance(urls, dict) or not all(isinstance(v, dict) and isinstance(v.get("imageURL"), str)
                                             for v in urls.values()):
        raise ValueError(f"--ocr-vqa-urls {ref}: expected OCR-VQA's dataset.json, an object "
                         '{"<image id>": {"imageURL": "http...", ...}, ...}')
    return urls


def ocr_vqa_ids(data: str) -> list[str]:
    """The OCR-VQA image ids `data` (LLaVA's json) names as ocr_vqa/images/<id>.jpg, in order, once each;
    ValueError naming the file when it is not a JSON list."""
    try:
        with open(data, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{data}:{e.lineno}: not valid JSON ({e.msg}): delete it and run again") from None
    if not isinstance(entries, list):
        raise ValueError(f"{data}: expected a JSON list of LLaVA entries, got {type(entries).__name__}")
    prefix = OCR_VQA_FOLDER + "/"
    named = (e.get("image") for e in entries if isinstance(e, dict))
    return list(dict.fromkeys(os.path.splitext(im[len(prefix):])[0] for im in named
                              if isinstance(im, str) and im.startswith(prefix)))


def _present(folder: str, image_id: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, image_id + ext)) for ext in OTHER_EXTENSIONS)


def ocr_vqa_from_urls(ref: str, root: str, data: str, *, mirrors: dict[str, str], workers: int,
                      **kw) -> list[str]:
    """Download each OCR-VQA image `data` names from its imageURL in OCR-VQA's `ref` (dataset.json), in
    `workers` threads, each saved as <root>/ocr_vqa/images/<id><the URL's extension> (a .gif or .png is
    written as the .jpg the json names by the check's repair). Returns the report's problem lines."""
    folder = os.path.join(root, OCR_VQA_FOLDER)
    try:
        urls = _ocr_vqa_list(ref, root, mirrors, **kw)
        ids = ocr_vqa_ids(os.path.join(root, data))
    except (ValueError, DownloadError) as e:
        return [str(e)]
    unlisted = [i for i in ids if i not in urls]
    items = []
    for i in ids:
        if i in urls and not _present(folder, i):
            url = urls[i]["imageURL"]
            ext = os.path.splitext(urlsplit(url).path)[1].lower() or ".jpg"
            items.append((mirrored(url, mirrors), os.path.join(folder, i + ext)))
    print(f"ocr_vqa/images: {len(ids)} images named by {data}, {len(ids) - len(items) - len(unlisted)} in place, "
          f"{len(items)} to download from their URLs", flush=True)
    failures = download_many(items, what="ocr_vqa/images", workers=workers, **kw)
    gone = [(u, e) for u, _, e in failures if e.status in GONE]
    retry = [(u, e) for u, _, e in failures if e.status not in GONE]
    if not (gone or retry or unlisted):
        return []
    lines = [f"ocr_vqa/images: {len(gone) + len(retry) + len(unlisted)} of the {len(ids)} images {data} names "
             f"are not in place:"]
    if gone:
        lines.append(f"  {len(gone)} no longer exist upstream (HTTP {'/'.join(map(str, GONE))}), e.g. "
                     f"{gone[0][1]}")
    if unlisted:
        lines.append(f"  {len(unlisted)} are not in {ref}, e.g. {unlisted[0]}")
    if retry:
        lines.append(f"  {len(retry)} failed otherwise (run again to retry them), e.g. {retry[0][1]}")
    if gone or unlisted:
        lines.append("  for those: run without --ocr-vqa-urls to take them from the mirror archive, or train on "
                     f"what you have: python -m fastllava.data.check {os.path.join(root, data)} --image-folder "
                     f"{root} --repair --usable usable.json")
    return lines


def convert_scienceqa(root: str, folder: str, splits: tuple[str, ...], fmt: str) -> list[str]:
    """ScienceQA's release under <root>/<folder> (problems.json, pid_splits.json, images/<split>/) converted
    in place into llava_<split>_<fmt>.json and the eval task's files (fastllava.data.scienceqa); the
    problems it skipped (an image not on disk, a malformed problem) are the report's problem lines."""
    out = Path(root) / folder
    try:
        result = scienceqa.convert(out / "problems.json", out / "pid_splits.json", out / "images", [fmt], out,
                                   splits=list(splits))
    except ValueError as e:
        return [f"scienceqa: {e}"]
    skipped = result["skipped"]
    print(f"scienceqa: converted {result['converted']} problems into {', '.join(result['written'])}", flush=True)
    if not skipped:
        return []
    return [f"scienceqa: {len(skipped)} problems were left out (listed in {out / 'scienceqa_skipped.json'}), "
            f"e.g. {skipped[0].pid} ({skipped[0].split}): {skipped[0].reason}",
            f"  an image missing: delete {out}/images/<split>/.<split>.zip.unpacked (and <split>.zip) and run again "
            f"to unpack (and download) that split again"]
