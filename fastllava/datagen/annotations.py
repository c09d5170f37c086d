"""Image annotations that the text-only model sees in place of the image: captions and labelled boxes.

Two inputs:

COCO   captions_*.json (images + captions) and instances_*.json (images + categories + boxes), files or a
       folder holding them. COCO boxes are [x, y, w, h] in pixels; they become [x1, y1, x2, y2] normalized
       to [0, 1] with 3 decimals, as the LLaVA paper (Table 14) and its prompt examples show them.
JSONL  one object per line: {"image": "a.jpg", "id": "a" (optional, default the image),
       "captions": ["..."], "boxes": [{"category": "dog", "bbox": [x1, y1, x2, y2]}]} with bbox already
       normalized to [0, 1].

Anything malformed is a ValueError naming the file and the record.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

BOX_DECIMALS = 3


@dataclass(frozen=True)
class Box:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in [0, 1]


@dataclass
class ImageContext:
    """What one image's prompt is built from."""

    id: str
    image: str  # path as written to the training data's "image"
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)

    def text(self) -> str:
        """The context as LLaVA's prompts show it: the captions, one a line, a blank line, then
        "category: [x1, y1, x2, y2]" per box."""
        lines = list(self.captions)
        if self.boxes:
            lines.append("")
            lines += [f"{b.category}: [{', '.join(str(float(v)) for v in b.bbox)}]" for b in self.boxes]
        return "\n".join(lines)


def normalize_coco_box(xywh: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """COCO's pixel [x, y, w, h] -> [x1, y1, x2, y2] / image size, clamped to [0, 1], 3 decimals."""
    x, y, w, h = (float(v) for v in xywh)
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return tuple(round(min(max(v, 0.0), 1.0), BOX_DECIMALS) for v in corners)


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO annotation file (expected an object with an 'images' list)")
    return data


def _field(path: str, what: str, index: int, record: object, key: str, types):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}: {what} {index} has no {key!r} (record: {str(record)[:200]})")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{path}: {what} {index}: {key!r} has type {type(value).__name__} (record: {str(record)[:200]})")
    return value


def load_coco(paths: Sequence[str]) -> list[ImageContext]:
    """Merge COCO captions and instances files into one context per listed image, in image-id order. An
    image without captions (an instances file alone) gets none; the run skips and counts it."""
    images: dict[int, dict] = {}
    captions: dict[int, list[str]] = {}
    boxes: dict[int, list[tuple[str, str, int, list]]] = {}
    for path in paths:
        data = _load_json(path)
        for i, im in enumerate(data["images"]):
            image_id = _field(path, "image", i, im, "id", int)
            _field(path, "image", i, im, "file_name", str)
            images.setdefault(image_id, im)
        categories = {}
        for i, cat in enumerate(data.get("categories", [])):
            categories[_field(path, "category", i, cat, "id", int)] = _field(path, "category", i, cat, "name", str)
        for i, ann in enumerate(data.get("annotations", [])):
            image_id = _field(path, "annotation", i, ann, "image_id", int)
            if "caption" in ann:
                captions.setdefault(image_id, []).append(_field(path, "annotation", i, ann, "caption", str).strip())
            elif "bbox" in ann:
                cat = _field(path, "annotation", i, ann, "category_id", int)
                if cat not in categories:
                    raise ValueError(f"{path}: annotation {i}: category_id {cat} is not in the file's categories")
                bbox = _field(path, "annotation", i, ann, "bbox", list)
                if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                    raise ValueError(f"{path}: annotation {i}: bbox must be 4 numbers [x, y, w, h], got {bbox}")
                boxes.setdefault(image_id, []).append((categories[cat], path, i, bbox))
            else:
                raise ValueError(f"{path}: annotation {i} has neither 'caption' nor 'bbox'")
    for image_id in (*captions, *boxes):
        if image_id not in images:
            raise ValueError(f"annotations for image id {image_id} but no file lists that image in 'images'")
    out = []
    for image_id in sorted(images):
        im = images[image_id]
        ctx = ImageContext(str(image_id), im["file_name"], captions.get(image_id, []))
        for category, path, i, bbox in boxes.get(image_id, []):
            w, h = im.get("width"), im.get("height")
            if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
                raise ValueError(f"{path}: annotation {i}: image {image_id} needs a positive 'width' and 'height' "
                                 "to normalize its boxes")
            ctx.boxes.append(Box(category, normalize_coco_box(bbox, w, h)))
        out.append(ctx)
    return out


def load_jsonl(path: str) -> list[ImageContext]:
    """Read the simple JSONL format (see the module docstring)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON, column {e.colno}: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ValueError(f"{where}: each record needs an 'image' path string")
            caps = rec.get("captions", [])
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
            rec_id = rec.get("id", rec["image"])
            if not isinstance(rec_id, (str, int)) or isinstance(rec_id, bool):
                raise ValueError(f"{where}: 'id' must be a string or integer")
            ctx = ImageContext(str(rec_id), rec["image"], [c.strip() for c in caps])
            for j, box in enumerate(rec.get("boxes", [])):
                bbox = box.get("bbox") if isinstance(box, dict) else None
                if (not isinstance(box, dict) or not isinstance(box.get("category"), str) or not isinstance(bbox, list)
                        or len(bbox) != 4 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in bbox)):
                    raise ValueError(f"{where}: box {j} must be {{'category': str, 'bbox': [x1, y1, x2, y2] "
                                     f"in [0, 1]}}, got {box}")
                ctx.boxes.append(Box(box["category"], tuple(round(float(v), BOX_DECIMALS) for v in bbox)))
            out.append(ctx)
    return out


def load_annotations(paths: Sequence[str]) -> list[ImageContext]:
    """Contexts from files and folders: *.jsonl files are the simple format, *.json files COCO; a folder
    contributes its captions_*.json and instances_*.json. Ids must be unique."""
    coco, contexts = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "captions_*.json")) + glob.glob(os.path.join(p, "instances_*.json")))
            if not found:
                raise ValueError(f"{p}: folder holds no captions_*.json or instances_*.json")
            coco += found
        elif not os.path.isfile(p):
            raise ValueError(f"annotations {p!r} do not exist")
        elif p.endswith(".jsonl"):
            contexts += load_jsonl(p)
        else:
            coco.append(p)
    if coco:
        contexts += load_coco(coco)
    seen = set()
    for ctx in contexts:
        if ctx.id in seen:
            raise ValueError(f"image id {ctx.id!r} appears twice in the annotations {list(paths)}")
        seen.add(ctx.id)
    return contexts
