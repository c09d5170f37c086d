"""Download a LLaVA training dataset by name into LLaVA's layout, then check it.

    python -m fastllava.data.prepare llava-1.5-pretrain --root ./playground/data [--revision main]
                                     [--source-url URL] [--retries N] [--workers N]

Each file is downloaded resumably (an interrupted run continues from its .part), unpacked once (a marker
file records a finished unpack), and the layout is then checked with `python -m fastllava.data.check`,
whose report is printed. Exit status: 0 when every image the json names is present and decodes, 1 when
a download failed or anything is missing or broken (run again to resume), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Sequence

from .. import check
from .download import DownloadError, download
from .sources import DATASETS, NOT_YET, Dataset, auth_headers, endpoint_default


def _marker(archive: str, into: str) -> str:
    return os.path.join(into, f".{os.path.basename(archive)}.unpacked")


def unpack(archive: str, into: str) -> None:
    """Unzip `archive` into the folder `into` once: a marker `<into>/.<archive name>.unpacked` is written only
    after every member is out, so an interrupted unpack is redone. A zip whose members all sit under one
    folder named like `into` ("images/...") is unpacked beside it, so the files do not land in images/images."""
    marker = _marker(archive, into)
    if os.path.exists(marker):
        return
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            prefix = os.path.basename(os.path.normpath(into)) + "/"
            target = os.path.dirname(os.path.normpath(into)) if all(n.startswith(prefix) for n in names) else into
            print(f"unpacking {archive} ({len(names)} members) into {into}", flush=True)
            # zipfile drops absolute paths and '..' from member names, and checks each member's CRC as it
            # reads it (BadZipFile on a damaged one).
            z.extractall(target)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive} is not a valid zip archive ({e}): delete it and run again to download "
                            f"it again") from None
    os.makedirs(into, exist_ok=True)
    open(marker, "w").close()


def fetch(ds: Dataset, root: str, *, endpoint: str, revision: str, retries: int, backoff: float) -> list[str]:
    """Download and unpack every file of `ds` under `root`; returns the errors (empty when all is in place)."""
    base = os.path.join(root, ds.folder)
    errors = []
    for f in ds.files:
        dest = os.path.join(base, f.path)
        what = f"{ds.name}: {f.path}"
        try:
            if f.unpack_to is not None and os.path.exists(_marker(f.path, os.path.join(base, f.unpack_to))):
                continue  # unpacked by an earlier run (the archive may have been deleted since)
            download(ds.url(endpoint, revision, f), dest, what=what, size=f.size, retries=retries,
                     backoff=backoff, headers=auth_headers())
            if f.unpack_to is not None:
                unpack(dest, os.path.join(base, f.unpack_to))
        except DownloadError as e:
            errors.append(str(e))
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m fastllava.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("name", help=f"the dataset: {', '.join(DATASETS)} (not yet: {', '.join(NOT_YET)})")
    p.add_argument("--root", required=True, help="the data folder (LLaVA's ./playground/data); created")
    p.add_argument("--revision", default="main", help="the Hub repository's branch, tag or commit (default main)")
    p.add_argument("--source-url", default=None,
                   help=f"the Hub's address or a mirror of it (default $HF_ENDPOINT, else {endpoint_default()})")
    p.add_argument("--retries", type=int, default=5, help="retries per file after a broken connection or a 5xx")
    p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes checking images at the end")
    args = p.parse_args(argv)
    if args.name not in DATASETS:
        later = f"; {args.name} is not written yet" if args.name in NOT_YET else ""
        p.error(f"unknown dataset {args.name!r}{later}; available: {', '.join(DATASETS)}")
    for flag, v in (("--retries", args.retries), ("--backoff", args.backoff)):
        if v < 0:
            p.error(f"{flag} must be >= 0, got {v}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    ds = DATASETS[args.name]
    errors = fetch(ds, args.root, endpoint=args.source_url or endpoint_default(), revision=args.revision,
                   retries=args.retries, backoff=args.backoff)
    if errors:
        print(f"{ds.name}: {len(errors)} of {len(ds.files)} files are not in place:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        print("run the same command again to resume; nothing complete is downloaded twice", file=sys.stderr)
        return 1
    base = os.path.join(args.root, ds.folder)
    print(f"{ds.name}: files in place under {base}; checking the layout", flush=True)
    return check.main([os.path.join(base, ds.data), "--image-folder", os.path.join(base, ds.images),
                       "--workers", str(args.workers), "--mode", "square"])


if __name__ == "__main__":
    sys.exit(main())
