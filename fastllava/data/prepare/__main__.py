"""Download a LLaVA training dataset by name into LLaVA's layout, then check it.

    python -m fastllava.data.prepare NAME --root ./playground/data [--mirror HOST=URL ...]
        [--revision [REPO=]REV ...] [--source-url URL] [--ocr-vqa-urls DATASET_JSON] [--retries N]
        [--backoff S] [--timeout S] [--jobs N] [--download-workers N] [--workers N] [--delete-archives]

Each file is downloaded resumably (an interrupted run continues from its .part), unpacked once (a marker
file records a finished unpack), and the layout is then checked with `python -m fastllava.data.check`,
whose report is printed. Exit status: 0 when every image the json files name is present and decodes,
1 when a download failed or anything is missing or broken (run the same command again to resume),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from urllib.parse import urlsplit

from .. import check
from .download import DownloadError, download
from .sources import (DATASETS, OCR_VQA_LABEL, SQA_FORMAT, SQA_SPLITS, Dataset, RemoteFile, auth_headers,
                      endpoint_default, hosts)
from .steps import convert_scienceqa, ocr_vqa_from_urls
from .unpack import marker, unpack


def _say(line: str) -> None:
    """One line on stdout in one write, so that the lines of files fetched at once do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fetch_one(ds: Dataset, f: RemoteFile, root: str, tag: str, *, endpoint: str, revisions: dict[str, str],
              mirrors: dict[str, str], delete_archives: bool = False, **kw) -> list[str]:
    """Download and unpack the file `f` of `ds` under `root` (`tag` leads its lines: "[2/7]"); returns the
    report's error lines, empty when it is in place."""
    dest = os.path.join(root, f.dest)
    url = f.address(endpoint, revisions, mirrors)
    into = None if f.unpack_to is None else os.path.join(root, f.unpack_to)
    if into is not None and os.path.exists(marker(dest, into)):
        _say(f"{tag} {f.label}: unpacked by an earlier run")
        return []  # the archive may have been deleted since
    # An existing dest is a whole file (only those are renamed into place): download() checks it, fetches nothing.
    _say(f"{tag} {f.label}: " + ("downloaded by an earlier run" if os.path.exists(dest) else url))
    try:
        download(url, dest, what=f"{ds.name}: {f.label}", size=f.size, sha256=f.sha256, headers=auth_headers(f),
                 desc=f.label, **kw)
        if into is not None:
            unpack(dest, into, top=f.top)
            if delete_archives:
                os.remove(dest)
    except DownloadError as e:
        errors = [str(e)]
        host = urlsplit(f.address(endpoint, revisions, {})).netloc
        if e.status is not None or e.unreachable:
            why = f"the server answered HTTP {e.status}" if e.status else "no server answered"
            errors.append(f"  {why}: if {host} is not reachable from here, or the file has moved, point "
                          f"--mirror {host}=URL at a copy" + (" (one is given: check it)" if host in mirrors else ""))
        return errors
    return []


def fetch(ds: Dataset, root: str, *, jobs: int = 1, skip: tuple[str, ...] = (), **kw) -> list[str]:
    """Download and unpack every file of `ds` under `root` but those labelled in `skip`, `jobs` files at a
    time (fetch_one's keywords in `kw`); returns the errors in the files' order (empty when all is in place)."""
    files = [f for f in ds.files if f.label not in skip]
    tags = [f"[{k}/{len(files)}]" for k in range(1, len(files) + 1)]
    # Threads, not processes: a download waits on its socket, an unpack mostly on the disk. The hosts are
    # independent (Stanford's, COCO's, the Hub's), so one slow host need not hold up the others.
    with ThreadPoolExecutor(jobs) as pool:
        done = pool.map(lambda f, tag: fetch_one(ds, f, root, tag, **kw), files, tags)
        return [line for lines in done for line in lines]


def run_checks(ds: Dataset, root: str, workers: int) -> int:
    """The layout checker on each of the dataset's json files; 0 when all pass, else 1."""
    status = 0
    for c in ds.checks:
        images = os.path.join(root, c.images)
        data = [os.path.join(root, d) for d in c.data]
        print(f"{ds.name}: checking {', '.join(data)} against {images}", flush=True)
        absent = [path for path in (*data, images) if not os.path.exists(path)]
        if absent:  # the checker would stop with a usage error (exit 2)
            print(f"{', '.join(absent)}: not in place", file=sys.stderr)
            status = 1
            continue
        argv = [*data, "--image-folder", images, "--workers", str(workers), "--mode", c.mode]
        try:
            status |= check.main(argv + (["--repair"] if c.repair else []))
        except SystemExit:  # the checker could not read a json (it said which and why): a broken download
            print("delete the json named above and run again to download it again", file=sys.stderr)
            status = 1
    return status


def _pairs(p: argparse.ArgumentParser, flag: str, values: list[str], *, bare: str | None = None) -> dict[str, str]:
    """KEY=VALUE arguments as a dict; a bare VALUE is stored under `bare` where one is allowed."""
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq and bare is not None:
            key, value = bare, v
        elif not eq or not key or not value:
            p.error(f"{flag} {v!r}: expected KEY=VALUE")
        out[key] = value
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = "\n".join(f"  {n:<20} {ds.about}" for n, ds in DATASETS.items())
    p = argparse.ArgumentParser(prog="python -m fastllava.data.prepare", description=__doc__.split("\n")[0],
                                epilog=f"datasets:\n{names}\n\nhosts the sources are on (for --mirror): "
                                       f"{', '.join(hosts())}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"the dataset: {', '.join(DATASETS)}")
    p.add_argument("--root", required=True, help="the data folder (LLaVA's ./playground/data); created")
    p.add_argument("--mirror", action="append", default=[], metavar="HOST=URL",
                   help="fetch every file of HOST from URL instead (same paths below it); repeatable")
    p.add_argument("--revision", action="append", default=[], metavar="[REPO=]REV",
                   help="the Hub repositories' branch, tag or commit (default main); REPO=REV for one of them")
    p.add_argument("--source-url", default=None,
                   help=f"the Hub's address or a mirror of it (default $HF_ENDPOINT, else {endpoint_default()})")
    p.add_argument("--ocr-vqa-urls", default=None, metavar="DATASET_JSON",
                   help="fetch OCR-VQA's images one by one from the URLs of OCR-VQA's dataset.json (a path or a "
                        "URL) instead of the mirror archive; some no longer exist upstream")
    p.add_argument("--retries", type=int, default=5, help="retries per file after a broken connection or a 5xx")
    p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without a byte before a retry")
    p.add_argument("--jobs", type=int, default=4, help="files downloaded (and unpacked) at once, default 4")
    p.add_argument("--download-workers", type=int, default=16, help="threads fetching OCR-VQA's per-image URLs")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes checking images at the end")
    p.add_argument("--delete-archives", action="store_true", help="delete each archive once it is unpacked")
    args = p.parse_args(argv)
    if args.name not in DATASETS:
        p.error(f"unknown dataset {args.name!r}; available: {', '.join(DATASETS)}")
    for flag, v in (("--retries", args.retries), ("--backoff", args.backoff)):
        if v < 0:
            p.error(f"{flag} must be >= 0, got {v}")
    for flag, v in (("--workers", args.workers), ("--jobs", args.jobs), ("--download-workers", args.download_workers),
                    ("--timeout", args.timeout)):
        if not v > 0:
            p.error(f"{flag} must be > 0, got {v}")
    args.mirrors = _pairs(p, "--mirror", args.mirror)
    for host, url in args.mirrors.items():
        if "/" in host or not url.startswith(("http://", "https://")):
            p.error(f"--mirror {host}={url}: expected HOST=http(s)://..., HOST a host name such as "
                    f"images.cocodataset.org")
    args.revisions = _pairs(p, "--revision", args.revision, bare="*")
    repos = {f.repo for f in DATASETS[args.name].files if f.repo}
    for repo in set(args.revisions) - repos - {"*"}:
        p.error(f"--revision {repo}=...: {args.name} reads no Hub repository {repo}; it reads {', '.join(sorted(repos))}")
    if args.ocr_vqa_urls and DATASETS[args.name].ocr_vqa is None:
        p.error(f"--ocr-vqa-urls: {args.name} has no OCR-VQA images")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    args = parse_args(argv)
    ds = DATASETS[args.name]
    repos = {f.repo for f in ds.files if f.repo}
    revisions = {r: args.revisions.get(r, args.revisions.get("*", "main")) for r in repos}
    kw = dict(retries=args.retries, backoff=args.backoff, timeout=args.timeout)
    skip = (OCR_VQA_LABEL,) if args.ocr_vqa_urls else ()
    errors = fetch(ds, args.root, jobs=args.jobs, skip=skip, endpoint=args.source_url or endpoint_default(),
                   revisions=revisions, mirrors=args.mirrors, delete_archives=args.delete_archives, **kw)
    if errors:
        print(f"{ds.name}: some files are not in place:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        print("run the same command again to resume; nothing complete is downloaded twice", file=sys.stderr)
        return 1
    problems = []
    if args.ocr_vqa_urls:
        problems += ocr_vqa_from_urls(args.ocr_vqa_urls, args.root, ds.ocr_vqa, mirrors=args.mirrors,
                                      workers=args.download_workers, **kw)
    if ds.scienceqa:
        problems += convert_scienceqa(args.root, ds.scienceqa, SQA_SPLITS, SQA_FORMAT)
    print(f"{ds.name}: files in place under {args.root}; checking the layout", flush=True)
    status = run_checks(ds, args.root, args.workers)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else status


if __name__ == "__main__":
    sys.exit(main())
