"""Check a data layout before a run: every image every entry references exists and decodes.

    python -m fastllava.data.check DATA.json [DATA2.json ...] --image-folder DIR [--workers N]
                                   [--mode pad|square|anyres] [--repair] [--usable OUT.json] [--broken OUT.jsonl]

Each distinct image is decoded in a pool of processes with images.py's own decode (`pil_decode`: a
truncated file, an unidentifiable one and a decompression bomb are refused as the loader would refuse
them; --mode says which preprocessing's pixel limit applies: an AnyRes run's, "anyres", holds no square
canvas nor resized copy, so it takes a 1 x 10000 strip that "pad" and "square" refuse; it also checks the
size read from the header, as an AnyRes run counts visual tokens) and counted per source folder (the first
two folders of its path, e.g. coco/train2017, ocr_vqa/images) as one of
  present    the file decodes;
  missing    no file at the path, nor under another extension;
  corrupt    a file that does not decode (zero bytes, truncated, not an image, a bomb), at the path or,
             when only that is there, under another extension;
  other_ext  X.jpg named, only X.gif / X.png / X.jpeg / ... on disk, and it decodes: OCR-VQA's download
             saves each image under the extension its server sent. --repair writes a real JPEG (RGB,
             quality 95) at the named path, as LLaVA's docs tell users to do by hand (a real PNG where
             X.png is named, and so on); it then counts as repaired. Missing and corrupt files cannot
             be repaired: download them again.
Entries the trainer would reject for their structure (files.py) are counted too. --usable writes the
entries whose images are all good (a JSON list, the inputs concatenated), and says how many were dropped
for which reason in which folder; --broken lists every image that is not good, one JSON line each
({"image", "source", "status", "detail"}), for a re-download. Exit status: 0 when everything is usable,
1 when anything is broken (also after writing --usable), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from PIL import Image

from ..progress import progress
from .anyres_images import image_size
from .files import RejectLog, image_list, load_records
from .images import ImageError, pil_decode

STATUSES = ("present", "missing", "corrupt", "other_ext", "repaired")
GOOD = ("present", "repaired")
# What an image saved under another extension may be called; the named one is skipped.
OTHER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".JPG", ".JPEG", ".PNG", ".GIF")
# Images per task sent to a worker: large enough that pickling and scheduling stay small next to a
# decode (3 ms a 640x480 JPEG, 2-core CPU, 2026-12-06), small enough that the progress bar moves.
CHUNK = 64
JPEG_QUALITY = 95
_DEPTH = 2  # folders of an image path that name its source


def source_of(image: str) -> str:
    """The source folder of an image path: its first two folders ("coco/train2017/1.jpg" -> "coco/train2017",
    "00000/1.jpg" -> "00000", "1.jpg" -> ".")."""
    folders = os.path.normpath(image).split(os.sep)[:-1]
    return "/".join(folders[:_DEPTH]) or "."


def _decodes(path: str, mode: str) -> str | None:
    """None when `path` decodes as the loader would decode it, else why not. In mode "anyres" the size its
    header gives (anyres_images.image_size, from which the run counts the image's visual tokens before any
    decode) must also be the decoded size, or the tiles would not match the count."""
    try:
        header = image_size(path) if mode == "anyres" else None
        img = pil_decode(path, mode)
    except ImageError as e:
        return str(e)
    if header is not None and header != (img.height, img.width):
        return (f"{path}: its header gives {header[1]}x{header[0]} (width x height) but it decodes to "
                f"{img.width}x{img.height}: its visual-token count would not match its tiles")
    return None


def _rewrite(src: str, dst: str, mode: str) -> None:
    """The image of src written at dst in the format dst's extension names (JPEG, RGB, for the usual .jpg;
    JPEG for an extension Pillow does not know), through a temporary file so that an interrupted repair
    never leaves a partial file under the name the data uses."""
    fmt = Image.registered_extensions().get(os.path.splitext(dst)[1].lower(), "JPEG")
    tmp = f"{dst}.repair-{os.getpid()}.tmp"
    try:
        pil_decode(src, mode).save(tmp, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_image(full: str, mode: str = "pad", repair: bool = False) -> tuple[str, str]:
    """(status, detail) of the image file `full` (see the module docstring); with repair, an image present
    only under another extension is rewritten at `full` (see _rewrite) and comes back "repaired"."""
    if os.path.isfile(full):
        why = _decodes(full, mode)
        return ("present", "") if why is None else ("corrupt", why)
    stem, named = os.path.splitext(full)
    for ext in OTHER_EXTENSIONS:
        other = stem + ext
        if ext == named or not os.path.isfile(other):
            continue
        why = _decodes(other, mode)
        if why is not None:
            return "corrupt", f"{full} is missing and {why}"
        if not repair:
            return "other_ext", f"{full} is missing, {other} is there: --repair writes it as a JPEG"
        _rewrite(other, full, mode)
        why = _decodes(full, mode)
        return ("repaired", f"{full} written from {other}") if why is None else ("corrupt", why)
    return "missing", f"{full} does not exist"


def _check_chunk(fulls: list[str], mode: str, repair: bool) -> list[tuple[str, str]]:
    return [check_image(f, mode, repair) for f in fulls]


def check_images(images: Sequence[str], image_folder: str, *, workers: int, mode: str = "pad",
                 repair: bool = False) -> dict[str, tuple[str, str]]:
    """{image path as the data names it: (status, detail)} for each distinct image, decoded in `workers`
    processes (1: in this process), with a progress bar."""
    images = list(dict.fromkeys(images))
    fulls = [os.path.join(image_folder, p) for p in images]
    chunks = [fulls[i : i + CHUNK] for i in range(0, len(fulls), CHUNK)]
    results: list[tuple[str, str]] = []
    with progress(len(fulls), desc="check images", unit="img", file=sys.stderr) as bar:
        if workers == 1:
            done = (_check_chunk(c, mode, repair) for c in chunks)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers)
            done = pool.map(_check_chunk, chunks, [mode] * len(chunks), [repair] * len(chunks))
        try:
            for part in done:
                results.extend(part)
                bar.update(len(part))
                bar.set_postfix(f"broken {sum(s not in GOOD for s, _ in results)}")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return dict(zip(images, results))


def table(results: dict[str, tuple[str, str]]) -> str:
    """Counts per source folder and status, with a total row."""
    counts: dict[str, Counter] = {}
    for image, (status, _) in results.items():
        counts.setdefault(source_of(image), Counter())[status] += 1
    total = sum(counts.values(), Counter())
    width = max([len(s) for s in counts] + [len("source"), len("total")])
    rows = [f"{'source':<{width}} {'images':>8} " + " ".join(f"{s:>9}" for s in STATUSES)]
    for name, c in sorted(counts.items()) + [("total", total)]:
        rows.append(f"{name:<{width}} {sum(c.values()):>8} " + " ".join(f"{c[s]:>9}" for s in STATUSES))
    return "\n".join(rows)


def _advice(results: dict[str, tuple[str, str]], repair: bool, examples: int = 3) -> list[str]:
    """What is broken (a few examples of each kind) and what to do about it."""
    todo = {"missing": "download them again; --usable OUT.json writes the entries you can train on now",
            "corrupt": "not repairable: download them again (or leave them out with --usable OUT.json)",
            "other_ext": "run again with --repair to write each as a JPEG at the path the data names"}
    lines = []
    for status, what in todo.items():
        broken = [d for s, d in results.values() if s == status]
        if broken:
            lines.append(f"{len(broken)} {status} image(s): {what}")
            lines.extend(f"  {d}" for d in broken[:examples])
    if repair:
        lines.append(f"repaired {sum(s == 'repaired' for s, _ in results.values())} image(s)")
    return lines


def write_usable(records, results: dict[str, tuple[str, str]], out: str, rejected: int) -> None:
    """Write the entries of `records` whose images are all good to `out` (JSON list); print what was dropped,
    per reason and source folder (the first bad image of an entry decides)."""
    kept, dropped = [], Counter()
    for i in range(len(records)):
        entry = records[i]
        bad = [(results[im][0], source_of(im)) for im in image_list(entry) if results[im][0] not in GOOD]
        if bad:
            dropped[bad[0]] += 1
        else:
            kept.append(entry)
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(kept, f, ensure_ascii=False)
    os.replace(tmp, out)
    print(f"--usable: wrote {len(kept)} entries to {out}; dropped {sum(dropped.values()) + rejected}")
    for (status, source), n in sorted(dropped.items()):
        print(f"  dropped {n} for {status} images in {source}")
    if rejected:
        print(f"  dropped {rejected} rejected for their structure")


def write_broken(results: dict[str, tuple[str, str]], out: str) -> int:
    """Every image of `results` that is not good, one JSON line each, to `out`; returns how many."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for image, (status, detail) in results.items():
            if status not in GOOD:
                f.write(json.dumps({"image": image, "source": source_of(image), "status": status, "detail": detail},
                                   ensure_ascii=False) + "\n")
                n += 1
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m fastllava.data.check", description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="+", help="dataset file(s), JSON list or JSONL, as the trainer reads them")
    p.add_argument("--image-folder", required=True, help="the folder the entries' image paths are relative to")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes decoding images (default: one per CPU; 1 decodes in this process)")
    p.add_argument("--mode", choices=("pad", "square", "anyres"), default="pad",
                   help="the preprocessing whose size limits apply (images.MAX_IMAGE_PIXELS): pad (stage 2, "
                        "default, the stricter), square (stage 1) or anyres (LLaVA-NeXT's tiles: only the decoded "
                        "image's own size; its header size must also be the decoded one)")
    p.add_argument("--repair", action="store_true",
                   help="write a JPEG at each named X.jpg that exists only as X.gif / X.png / ...")
    p.add_argument("--usable", metavar="OUT.json", help="write the entries whose images are all good here")
    p.add_argument("--broken", metavar="OUT.jsonl", help="list every image that is not good here, one JSON line each")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not os.path.isdir(args.image_folder):
        p.error(f"--image-folder {args.image_folder!r} is not a directory")
    for flag, out in (("--usable", args.usable), ("--broken", args.broken)):
        if out and any(os.path.abspath(out) == os.path.abspath(d) for d in args.data):
            p.error(f"{flag} {out!r} is one of the data files: write it to a new file")
    rejects = RejectLog()
    try:
        records = load_records(args.data, rejects=rejects)  # prints its summary (rejects by reason) on stderr
    except ValueError as e:  # a missing file, malformed JSON: say which, no traceback
        p.error(str(e))
    images = [image for i in range(len(records)) for image in image_list(records[i])]
    results = check_images(images, args.image_folder, workers=args.workers, mode=args.mode, repair=args.repair)
    print(table(results))
    for line in _advice(results, args.repair):
        print(line)
    rejected = records.summary.entries - len(records)
    if rejected:
        print(f"{rejected} entries rejected for their structure: the trainer skips them; e.g.")
        print("\n".join(f"  {r.describe()}" for r in rejects.examples[:3]))
    if args.usable:
        write_usable(records, results, args.usable, rejected)
    if args.broken:
        print(f"--broken: listed {write_broken(results, args.broken)} images in {args.broken}")
    broken = rejected + sum(s not in GOOD for s, _ in results.values())
    print("all images present and decodable" if not broken else "BROKEN: see above")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
