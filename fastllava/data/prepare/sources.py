"""What each dataset NAME of `python -m fastllava.data.prepare` fetches, and where it lands.

A dataset is a list of sources (one file each: a json kept as is, or a zip archive unpacked into a folder
of LLaVA's layout), optional post-download steps (OCR-VQA's per-image URLs instead of its mirror,
ScienceQA's conversion), and the checks the layout checker runs at the end (json files against an image
folder). Every path is relative to the `--root` folder (LLaVA's ./playground/data), so names that share a
source (COCO train2017 for llava-1.5-finetune and llava-instruct-158k) download and unpack it once.

Sources come from two kinds of address:
  Hub files   `<endpoint>/datasets/<repo>/resolve/<revision>/<file>`, fetched over plain HTTP rather than
              with huggingface_hub's hf_hub_download: the same resumable, verified downloader serves the
              sources that are not on the Hub, the files land in the layout instead of a second copy in
              the Hub cache (LLaVA-Pretrain's images.zip alone is 27 GB), and $HF_ENDPOINT (a Hub mirror)
              and $HF_TOKEN are honoured as huggingface_hub honours them; the token is sent to the Hub only.
  the hosts'  absolute URLs (images.cocodataset.org, downloads.cs.stanford.edu, ...), as LLaVA's README
  own URLs    and prismatic-vlms' prismatic/preprocessing/download.py name them.
`--mirror HOST=URL` rewrites every address on HOST to start with URL instead (a copy on a local server,
a closer mirror), Hub files included; the tests point every host at a loopback server this way.

No source publishes a size or checksum that we could record and verify offline (2026-12-06): the
downloader checks each file against the length its server announces, and a zip's CRCs are checked as it
is unpacked. `RemoteFile.size` / `sha256` are there for the sources that do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch.

    label: what it is, in progress lines and errors ("coco/train2017", "llava_v1_5_mix665k.json").
    url: an absolute http(s) URL, or None for a Hub file (`repo` + `path`).
    repo, path: the Hub dataset repository and the file's path in it.
    dest: where the download lands, relative to the root.
    unpack_to: None keeps the file; a folder relative to the root unzips it there (see unpack.py: a top
        folder of the archive named like this folder, e.g. train2017/ for coco/train2017, is not repeated).
    top: "*" drops the archive's common top folder whatever its name (a mirror whose layout is not
        published); None drops only a top folder named like `unpack_to`'s last folder.
    size, sha256: the published size in bytes and sha256, checked where given.
    """

    label: str
    dest: str
    url: str | None = None
    repo: str | None = None
    path: str | None = None
    unpack_to: str | None = None
    top: str | None = None
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self):
        assert (self.url is None) != (self.repo is None), "a file is either a URL or a Hub repo's path"

    def address(self, endpoint: str, revisions: dict[str, str], mirrors: dict[str, str]) -> str:
        """The URL to fetch: a Hub file under `endpoint` at its repo's revision (default main), then a
        mirror of its host if one is given."""
        url = self.url
        if url is None:
            url = f"{endpoint.rstrip('/')}/datasets/{self.repo}/resolve/{revisions.get(self.repo, 'main')}/{self.path}"
        return mirrored(url, mirrors)


def hub(repo: str, path: str, dest: str, **kw) -> RemoteFile:
    """The file `path` of the Hub dataset repository `repo`, fetched to `dest`."""
    return RemoteFile(label=dest if kw.get("unpack_to") is None else kw["unpack_to"], dest=dest, repo=repo,
                      path=path, **kw)


def web(url: str, dest: str, **kw) -> RemoteFile:
    """The file at `url` on its own host, fetched to `dest`."""
    return RemoteFile(label=dest if kw.get("unpack_to") is None else kw["unpack_to"], dest=dest, url=url, **kw)


@dataclass(frozen=True)
class Check:
    """One run of the layout checker: the json files `data` against the folder their "image" paths are
    relative to, with the preprocessing mode whose size limits apply; `repair` writes OCR-VQA's .gif/.png
    as the .jpg the json names."""

    data: tuple[str, ...]
    images: str
    mode: str = "pad"
    repair: bool = False


@dataclass(frozen=True)
class Dataset:
    """A dataset NAME: `files` fetched (and unpacked) under the root, then the `checks`.

    ocr_vqa: the json whose ocr_vqa/images/<id>.jpg images `--ocr-vqa-urls` fetches one by one from
        OCR-VQA's own URL list, in place of the file labelled OCR_VQA_LABEL (the mirror).
    scienceqa: the folder (relative to the root) where ScienceQA's release is converted into LLaVA's json.
    """

    name: str
    files: tuple[RemoteFile, ...]
    checks: tuple[Check, ...]
    ocr_vqa: str | None = None
    scienceqa: str | None = None
    about: str = field(default="", compare=False)


OCR_VQA_LABEL = "ocr_vqa/images"
OCR_VQA_FOLDER = "ocr_vqa/images"

PRETRAIN = (hub("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"),
            hub("liuhaotian/LLaVA-Pretrain", "images.zip", "LLaVA-Pretrain/images.zip", unpack_to="LLaVA-Pretrain/images"))
PRETRAIN_CHECK = Check(("LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",), "LLaVA-Pretrain/images", mode="square")

COCO = web("http://images.cocodataset.org/zips/train2017.zip", "coco/train2017.zip", unpack_to="coco/train2017")
# The five image sources of LLaVA-1.5's mix, as LLaVA's README lays them out and prismatic-vlms fetches them.
# Each archive holds one top folder named like its target (train2017/, images/, train_images/, VG_100K/,
# VG_100K_2/); TextVQA's train_val_images.zip holds train and val images together in train_images/.
FINETUNE_IMAGES = (
    COCO,
    web("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", "gqa/images.zip", unpack_to="gqa/images"),
    # OCR-VQA by default from the Hub mirror prismatic-vlms trains on: one resumable archive of every image.
    # The original per-image Amazon URLs (OCR-VQA's dataset.json) have partly died (LLaVA#1618: 355 of
    # 80K images missing; PR#1458); --ocr-vqa-urls fetches from them instead. The mirror's folder layout
    # is not published, hence top="*"; its .gif/.png images are rewritten as .jpg by the check's repair.
    hub("qnguyen3/ocr_vqa", "ocr_vqa.zip", "ocr_vqa/ocr_vqa.zip", unpack_to=OCR_VQA_FOLDER, top="*"),
    web("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip", "textvqa/train_val_images.zip",
        unpack_to="textvqa/train_images"),
    web("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "vg/images.zip", unpack_to="vg/VG_100K"),
    web("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "vg/images2.zip", unpack_to="vg/VG_100K_2"),
)
MIX665K = "llava_v1_5_mix665k.json"
FINETUNE = (hub("liuhaotian/LLaVA-Instruct-150K", MIX665K, MIX665K),) + FINETUNE_IMAGES
FINETUNE_CHECK = Check((MIX665K,), ".", mode="pad", repair=True)

SQA_SPLITS = ("train", "val", "test")
SQA_FORMAT = "QCM-LEA"  # the LLaVA paper's ScienceQA format, the one recipes/configs/scienceqa_7b.yaml reads
_SQA_GIT = "https://raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa"
# ScienceQA's release as its tools/download.sh fetches it: the json files from the git repository, each
# split's images from S3 (train.zip holds train/<pid>/image.png), unzipped into images/<split>/.
SCIENCEQA = (web(f"{_SQA_GIT}/problems.json", "scienceqa/problems.json"),
             web(f"{_SQA_GIT}/pid_splits.json", "scienceqa/pid_splits.json"),
             *(web(f"https://scienceqa.s3.us-west-1.amazonaws.com/images/{s}.zip", f"scienceqa/images/{s}.zip",
                   unpack_to=f"scienceqa/images/{s}") for s in SQA_SPLITS))

DATASETS = {ds.name: ds for ds in (
    Dataset("llava-1.5-pretrain", PRETRAIN, (PRETRAIN_CHECK,),
            about="LLaVA-1.5 stage 1: BLIP-captioned LAION/CC/SBU 558K (liuhaotian/LLaVA-Pretrain)"),
    Dataset("llava-1.5-finetune", FINETUNE, (FINETUNE_CHECK,), ocr_vqa=MIX665K,
            about="LLaVA-1.5 stage 2: llava_v1_5_mix665k.json + COCO, GQA, OCR-VQA, TextVQA, Visual Genome"),
    Dataset("llava-1.5", PRETRAIN + FINETUNE, (PRETRAIN_CHECK, FINETUNE_CHECK), ocr_vqa=MIX665K,
            about="both stages of LLaVA-1.5 under one root"),
    Dataset("llava-instruct-158k",
            (hub("liuhaotian/LLaVA-Instruct-150K", "llava_instruct_158k.json",
                 "LLaVA-Instruct-150K/llava_instruct_158k.json"), COCO),
            (Check(("LLaVA-Instruct-150K/llava_instruct_158k.json",), "coco/train2017"),),
            about="the first LLaVA's stage 2: llava_instruct_158k.json + COCO train2017"),
    Dataset("cc3m-595k",
            (hub("liuhaotian/LLaVA-CC3M-Pretrain-595K", "chat.json", "LLaVA-CC3M-Pretrain-595K/chat.json"),
             hub("liuhaotian/LLaVA-CC3M-Pretrain-595K", "images.zip", "LLaVA-CC3M-Pretrain-595K/images.zip",
                 unpack_to="LLaVA-CC3M-Pretrain-595K/images")),
            (Check(("LLaVA-CC3M-Pretrain-595K/chat.json",), "LLaVA-CC3M-Pretrain-595K/images", mode="square"),),
            about="the first LLaVA's stage 1: CC3M filtered to 595K (liuhaotian/LLaVA-CC3M-Pretrain-595K)"),
    Dataset("scienceqa", SCIENCEQA,
            tuple(Check((f"scienceqa/llava_{s}_{SQA_FORMAT}.json",), f"scienceqa/images/{s}", mode="square")
                  for s in SQA_SPLITS),
            scienceqa="scienceqa",
            about=f"ScienceQA's release (lupantech/ScienceQA) converted into LLaVA's json ({SQA_FORMAT})"),
)}


def hosts() -> list[str]:
    """Every host a dataset's files are fetched from, the Hub's included."""
    found = {urlsplit(f.url or HUB).netloc for ds in DATASETS.values() for f in ds.files}
    return sorted(found)


def mirrored(url: str, mirrors: dict[str, str]) -> str:
    """`url` with its scheme and host replaced by mirrors[host] where one is given."""
    parts = urlsplit(url)
    base = mirrors.get(parts.netloc)
    if base is None:
        return url
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def endpoint_default() -> str:
    """The Hub's address: $HF_ENDPOINT (a mirror) as huggingface_hub reads it, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or HUB


def auth_headers(f: RemoteFile) -> dict[str, str]:
    """An Authorization header from $HF_TOKEN for a Hub file when set (gated or private mirrors); never
    for another host."""
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token and f.repo is not None else {}
