"""What each dataset NAME of `python -m fastllava.data.prepare` fetches, and where it lands.

A dataset is a list of files in a Hub dataset repository, each either kept as is or unpacked (a zip) into
a folder of LLaVA's layout, plus the json and image folder the layout checker reads at the end. The Hub's
files are fetched over plain HTTP from `<endpoint>/datasets/<repo>/resolve/<revision>/<file>` rather than
with huggingface_hub's hf_hub_download: the same resumable, verified downloader serves the sources that
are not on the Hub (the image archives, OCR-VQA's per-image URLs), the files land in the layout instead of
a second copy in the Hub cache (images.zip alone is 27 GB), and tests point `--source-url` at a loopback
server. $HF_ENDPOINT and $HF_TOKEN are honoured as huggingface_hub honours them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub dataset repository.

    path: the file's path in the repository.
    unpack_to: None keeps the file at <root>/<folder>/<path>; a folder (relative to <root>/<folder>)
        unzips it there.
    size: its published size in bytes, None where we do not record one (the server's length is checked).
    """

    path: str
    unpack_to: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset NAME: `files` of Hub repository `repo` into <root>/<folder>; the checker then reads
    <root>/<folder>/<data> against the image folder <root>/<folder>/<images>."""

    name: str
    repo: str
    folder: str
    files: tuple[RemoteFile, ...]
    data: str
    images: str

    def url(self, endpoint: str, revision: str, f: RemoteFile) -> str:
        return f"{endpoint.rstrip('/')}/datasets/{self.repo}/resolve/{revision}/{f.path}"


DATASETS = {
    # LLaVA-1.5's stage 1 (and the first LLaVA's, filtered LAION/CC/SBU with BLIP captions): LLaVA's
    # README and prismatic-vlms' preprocessing/download.py name these two files; LLaVA unzips images.zip
    # into LLaVA-Pretrain/images, the folder the json's "image" paths ("00453/004539375.jpg") are relative to.
    "llava-1.5-pretrain": Dataset(
        name="llava-1.5-pretrain", repo="liuhaotian/LLaVA-Pretrain", folder="LLaVA-Pretrain",
        files=(RemoteFile("blip_laion_cc_sbu_558k.json"), RemoteFile("images.zip", unpack_to="images")),
        data="blip_laion_cc_sbu_558k.json", images="images"),
}
# Named by issue 25, not written yet: asked for, they stop with a line naming what exists.
NOT_YET = ("llava-1.5-finetune", "llava-1.5", "llava-instruct-158k", "cc3m-595k", "scienceqa")


def endpoint_default() -> str:
    """The Hub's address: $HF_ENDPOINT (a mirror) as huggingface_hub reads it, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or HUB


def auth_headers() -> dict[str, str]:
    """An Authorization header from $HF_TOKEN when set (gated or private mirrors); public repos need none."""
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
