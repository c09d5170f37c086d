"""Unzip a downloaded archive into a folder of LLaVA's layout, once, without repeating its top folder."""

from __future__ import annotations

import os
import zipfile
import zlib

from ...progress import progress
from .download import DownloadError


def marker(archive: str, into: str) -> str:
    """The file whose presence says `archive` was unpacked into `into` completely."""
    return os.path.join(into, f".{os.path.basename(archive)}.unpacked")


# The resource forks a zip made on macOS carries beside its real top folder; never part of a layout.
MACOS_EXTRAS = "__MACOSX/"


def top_to_drop(names: list[str], into: str, top: str | None) -> str:
    """The folder prefix ("train2017/", "ocr_vqa/images/" or "") to drop from every member name.

    The members' common folders are dropped up to the last one named like `into`'s last folder, so that
    train2017.zip's train2017/ lands as coco/train2017/ and not coco/train2017/train2017/; with top="*",
    all of the common folders (a mirror whose layout is not published: its images are the leaves).
    A common folder named otherwise is kept (LLaVA-Pretrain's images.zip: 00000/..., the json names it).
    """
    # A member "a/b.jpg" sits in folders [a]; a folder's own entry "a/" is the folder [a].
    folders = [n.rstrip("/").split("/")[: None if n.endswith("/") else -1] for n in names
               if not n.startswith(MACOS_EXTRAS)]
    if not folders:
        return ""
    common = folders[0]
    for f in folders[1:]:
        k = 0
        while k < min(len(common), len(f)) and common[k] == f[k]:
            k += 1
        common = common[:k]
    if top != "*":
        want = os.path.basename(os.path.normpath(into))
        common = common[: len(common) - common[::-1].index(want)] if want in common else []
    return "".join(c + "/" for c in common)


def unpack(archive: str, into: str, *, top: str | None = None, show: bool = True) -> None:
    """Unzip `archive` into the folder `into` once: the marker (see `marker`) is written only after every
    member is out, so an interrupted unpack is redone; the members' top folder is dropped as `top_to_drop`
    says. DownloadError names a damaged archive, with what to do."""
    done = marker(archive, into)
    if os.path.exists(done):
        return
    try:
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            drop = top_to_drop([i.filename for i in infos], into, top)
            with progress(len(infos), desc=f"unpack {os.path.basename(archive)}", unit="file", enabled=show) as bar:
                for info in infos:
                    bar.update(1)
                    if not info.filename.startswith(drop) or info.filename == drop \
                            or info.filename.startswith(MACOS_EXTRAS):
                        continue  # the dropped folder's own entry, macOS's extras
                    info.filename = info.filename[len(drop):]
                    # zipfile drops absolute paths and '..' from member names, and checks each member's
                    # CRC as it reads it (BadZipFile on a damaged one).
                    z.extract(info, into)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DownloadError(f"{archive} is not a valid zip archive ({e}): delete it and run again to download "
                            f"it again") from None
    os.makedirs(into, exist_ok=True)
    open(done, "w").close()
