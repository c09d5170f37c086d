"""The demo's world: a synthetic visual-question dataset of real JPEG files, and a tokenizer built from its
corpus, generated once into the cache directory (fastllava/cache_dir.py) with no network access.

Each image is a neutral background of one of several NON-square sizes (so `pad` and `square` preprocessing
differ) with 1 to 4 copies of ONE coloured shape, each centred in its own cell of a 2x2 grid ("top left",
"top right", "bottom left", "bottom right"). Question types, all answerable from the pixels alone and
worded so that neither the question nor an earlier turn gives an answer away:

    count     "How many shapes are there?"   -> "3"
    color     "What color are the shapes?"   -> "red"
    shape     "What shape are they?"         -> "triangle"
    position  "Where are the shapes?"        -> "top left and bottom right"
    describe  "Describe the image."          -> "There are 2 red circles in the top left and bottom right."
    text      "What is 3 plus 4?" (no image, 1 to 5 each)   -> "7"

Short-answer questions carry LLaVA-1.5's response-format prompt ("Answer the question using a single word
or phrase."). Files written under `root`:

    images/{train,eval}/NNNNNN.jpg
    train.json     LLaVA format, multi-turn (2-4 questions, then a description), `text_fraction` text-only
    eval.json      held-out images; every image asks each of count/color/shape/position once, plus text-only
                   samples; each sample has "question_types" aligned with its gpt turns
    pretrain.json  stage-1 captions: human "<image>", gpt the description sentence (the `plain` template)
    tokenizer/     a fast BPE tokenizer trained on the corpus (AutoTokenizer.from_pretrained loads it)
    COMPLETE.json  written last; its presence means the directory is whole

Generation is deterministic for a seed: identical arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

from ..cache_dir import cache_dir

RESPONSE_FORMAT = "Answer the question using a single word or phrase."
DESCRIBE_PROMPT = "Describe the image."

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
# Neutral tones only, so the colour of a shape is never confused with its background.
BACKGROUNDS = ((245, 245, 245), (200, 200, 200), (120, 120, 120))
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell index = 2 * row + col
# (width, height): deliberately non-square, wide and tall, so padding to a square moves the content.
DEFAULT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((96, 64), (64, 112), (80, 80), (112, 72), (72, 96))
QUESTION_TYPES = ("count", "color", "shape", "position", "describe", "text")
FORMAT_VERSION = 3  # bump when the content changes: caches of another version are rebuilt

# Template words (LLaVA's vicuna_v1 system prompt, roles, and its v0 variant), in the tokenizer's corpus
# so that no template ever meets <unk>.
_TEMPLATE_TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.\n### Human: ### Assistant:",
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour, grid cell and pixel box."""

    kind: str  # one of SHAPES
    color: str  # key of COLORS
    cell: int  # index into POSITIONS
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels of the original image, inclusive

    @property
    def position(self) -> str:
        """The cell's name, e.g. "top left"."""
        return POSITIONS[self.cell]

    @property
    def probe(self) -> tuple[int, int]:
        """A pixel well inside the drawn shape (for a triangle: below its centre, where it is widest)."""
        x0, y0, x1, y1 = self.box
        cy = (y0 + y1) // 2 if self.kind != "triangle" else y0 + (y1 - y0) * 2 // 3
        return (x0 + x1) // 2, cy


@dataclass(frozen=True)
class DemoPaths:
    """Where a generated world's files are."""

    root: Path
    image_folder: Path  # the LLaVA `image_folder`; "image" keys are relative to it
    train_json: Path
    eval_json: Path
    pretrain_json: Path
    tokenizer_dir: Path


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(
        root=root,
        image_folder=root / "images",
        train_json=root / "train.json",
        eval_json=root / "eval.json",
        pretrain_json=root / "pretrain.json",
        tokenizer_dir=root / "tokenizer",
    )


# ----------------------------------------------------------------------------------------------- images


def draw_scene(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[Shape]]:
    """One image of `size` (W, H): 1-4 copies of one coloured shape, each centred in its own grid cell."""
    width, height = size
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    cells = sorted(rng.sample(range(4), rng.randint(1, 4)))
    cw, ch = width // 2, height // 2
    side = int(min(cw, ch) * rng.uniform(0.7, 0.85))
    shapes = []
    for cell in cells:
        row, col = divmod(cell, 2)
        x0 = col * cw + (cw - side) // 2
        y0 = row * ch + (ch - side) // 2
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        fill = COLORS[color]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        shapes.append(Shape(kind=kind, color=color, cell=cell, box=box))
    return image, shapes


def positions(shapes: Sequence[Shape]) -> str:
    """The occupied cells in reading order: "top left", "top left and bottom right", ..."""
    words = [s.position for s in sorted(shapes, key=lambda s: s.cell)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"


def describe(shapes: Sequence[Shape]) -> str:
    """The templated description (and stage-1 caption) of a scene."""
    n, s = len(shapes), shapes[0]
    if n == 1:
        return f"There is 1 {s.color} {s.kind} in the {positions(shapes)}."
    return f"There are {n} {s.color} {s.kind}s in the {positions(shapes)}."


# -------------------------------------------------------------------------------------------- questions

# The questions name no attribute of the scene and read the same whatever the count, so no answer can be
# taken from the wording of a question or from an earlier turn: each one has to be read from the pixels.
QUESTIONS = {
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "color": ("What color are the shapes?", "What is the color of the shapes?"),
    "shape": ("What shape are they?", "Which shape is drawn?"),
    "position": ("Where are the shapes?", "Which cells of the image hold a shape?"),
}


def _ask(question: str) -> str:
    return f"{question}\n{RESPONSE_FORMAT}"


def _question(rng: random.Random, qtype: str, shapes: Sequence[Shape]) -> tuple[str, str]:
    """(human text, answer) of one question of `qtype` about the scene."""
    if qtype == "describe":
        return DESCRIBE_PROMPT, describe(shapes)
    if qtype not in QUESTIONS:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    answer = {"count": str(len(shapes)), "color": shapes[0].color, "shape": shapes[0].kind,
              "position": positions(shapes)}[qtype]
    return _ask(rng.choice(QUESTIONS[qtype])), answer


def _text_question(rng: random.Random) -> tuple[str, str]:
    # 25 small sums: few enough facts for a tiny model to learn from a fifth of the samples in minutes.
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    return _ask(f"What is {a} plus {b}?"), str(a + b)


def _conversation(turns: Sequence[tuple[str, str]], with_image: bool) -> list[dict]:
    conv = []
    for i, (human, gpt) in enumerate(turns):
        if i == 0 and with_image:
            human = f"<image>\n{human}"
        conv += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return conv


def _train_sample(rng: random.Random, shapes: Sequence[Shape], describe_fraction: float) -> tuple[list[dict], list[str]]:
    qtypes = rng.sample(list(QUESTIONS), rng.randint(2, 4))
    # A description is the densest image-grounded supervision (a dozen answer tokens that depend on the
    # pixels, against one or two per short answer). It comes last, so that no short answer can be copied
    # from it instead of read from the image.
    if rng.random() < describe_fraction:
        qtypes.append("describe")
    return _conversation([_question(rng, t, shapes) for t in qtypes], True), qtypes


def _eval_sample(rng: random.Random, shapes: Sequence[Shape]) -> tuple[list[dict], list[str]]:
    qtypes = list(QUESTIONS)
    rng.shuffle(qtypes)
    return _conversation([_question(rng, t, shapes) for t in qtypes], True), qtypes


# ----------------------------------------------------------------------------------------------- driver


def _write_split(
    root: Path,
    split: str,
    n: int,
    rng: random.Random,
    image_sizes: Sequence[tuple[int, int]],
    text_fraction: float,
    describe_fraction: float,
) -> tuple[list[dict], list[dict]]:
    """Returns (samples, captions) of one split, writing its JPEGs under root/images/<split>/."""
    folder = root / "images" / split
    folder.mkdir(parents=True)
    samples, captions = [], []
    for i in range(n):
        sid = f"{split}-{i:06d}"
        if rng.random() < text_fraction:
            n_turns = 1 if split == "eval" else rng.randint(1, 2)
            turns = [_text_question(rng) for _ in range(n_turns)]
            samples.append({"id": sid, "conversations": _conversation(turns, False), "question_types": ["text"] * n_turns})
            continue
        image, shapes = draw_scene(rng, rng.choice(image_sizes))
        rel = f"{split}/{i:06d}.jpg"
        image.save(root / "images" / rel, format="JPEG", quality=90)
        conv, qtypes = _eval_sample(rng, shapes) if split == "eval" else _train_sample(rng, shapes, describe_fraction)
        samples.append({"id": sid, "image": rel, "conversations": conv, "question_types": qtypes})
        captions.append(
            {"id": sid, "image": rel, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": describe(shapes)}]}
        )
    return samples, captions


def corpus_texts(samples: Iterable[dict]) -> Iterable[str]:
    """Every text the tokenizer will see: the template words, then each turn without the <image> tag."""
    from ..data.templates import TEMPLATES, VICUNA_SYSTEM

    yield from _TEMPLATE_TEXTS
    yield VICUNA_SYSTEM
    # The demo's own templates: the others' markers (<|eot_id|>, ...) would change the tokenizer it trains.
    yield " ".join(TEMPLATES[name].stop_str for name in ("plain", "vicuna_v1", "v0"))
    for sample in samples:
        for turn in sample["conversations"]:
            value = turn["value"].replace("<image>", " ")
            yield value
            if turn["from"] == "gpt":
                # The plain template puts a caption straight after "<image>": its first word then has no
                # "▁" word prefix, and should still be one token.
                yield "\n" + value


def train_demo_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 1000):
    """Train a small BPE tokenizer on `texts` and save it to `out_dir` as a fast tokenizer.

    LLaMA-like: SentencePiece-style "▁" word prefixes (so decoding restores spaces exactly), BOS "<s>"
    prepended by the post-processor, "</s>", "<unk>", "<pad>" and "<image>" as single special ids.
    With a small corpus, BPE stops merging once every corpus word is one token, so the vocabulary stays
    at a few hundred even though `vocab_size` allows more. Returns the loaded PreTrainedTokenizerFast.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Newlines split words (the response-format prompt follows the question after "\n").
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="right",
        model_max_length=2048,
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def _fingerprint(**params) -> dict:
    params = {k: list(map(list, v)) if k == "image_sizes" else v for k, v in params.items()}
    return {"format_version": FORMAT_VERSION, **params}


def is_complete(root: str | os.PathLike, **params) -> bool:
    """`root` holds a whole world generated with `params` (its COMPLETE.json says so)."""
    marker = Path(root) / "COMPLETE.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == _fingerprint(**params)


def default_cache_dir(**params) -> Path:
    """cache_dir()/demo-<hash of the generation parameters>."""
    digest = hashlib.sha1(json.dumps(_fingerprint(**params), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir(f"demo-{digest}")


def _is_demo_dataset(root: Path) -> bool:
    try:
        return "format_version" in json.loads((root / "COMPLETE.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _move_into_place(tmp: Path, root: Path, stale: bool, params: dict) -> None:
    try:
        os.rename(tmp, root)  # replaces an empty directory; fails on a non-empty one
        return
    except OSError:
        if is_complete(root, **params):  # another rank got there first
            return
        if not stale:
            raise
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    try:
        os.rename(root, trash / "d")  # may lose a race against another rank doing the same
    except OSError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not is_complete(root, **params):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def make_demo_dataset(
    root: str | os.PathLike | None = None,
    *,
    n_train: int = 4000,
    n_eval: int = 200,
    seed: int = 0,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    text_fraction: float = 0.1,
    describe_fraction: float = 1.0,
) -> DemoPaths:
    """Generate the demo dataset into `root` (default: `default_cache_dir(...)`) unless it is already there.

    Safe to call from several processes at once (torchrun ranks): each builds in its own temporary sibling
    directory and renames it into place; the loser of the race discards its copy. A directory without
    COMPLETE.json (an interrupted run) is never used. A demo dataset made with other parameters or an older
    FORMAT_VERSION (its COMPLETE.json says so) is replaced; any other non-empty directory is an error.
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"make_demo_dataset: n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    if not 0.0 <= text_fraction < 1.0:
        raise ValueError(f"make_demo_dataset: text_fraction must be in [0, 1), got {text_fraction}")
    image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
    for w, h in image_sizes:
        if min(w, h) < 32:
            raise ValueError(f"make_demo_dataset: image size {(w, h)} too small; each side must be >= 32 pixels")
    if not 0.0 <= describe_fraction <= 1.0:
        raise ValueError(f"make_demo_dataset: describe_fraction must be in [0, 1], got {describe_fraction}")
    params = dict(
        n_train=n_train,
        n_eval=n_eval,
        seed=seed,
        image_sizes=image_sizes,
        text_fraction=text_fraction,
        describe_fraction=describe_fraction,
    )
    root = Path(root) if root is not None else default_cache_dir(**params)
    if is_complete(root, **params):
        return _paths(root)
    # `root` only ever appears whole, by rename: a non-empty root without our marker is not ours to delete.
    stale = _is_demo_dataset(root)
    if not stale and root.exists() and any(root.iterdir()):
        raise ValueError(f"make_demo_dataset: {root} exists and is not a demo dataset; give an empty or new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        # One stream per split: the eval images do not change when n_train changes.
        train, pretrain = _write_split(
            tmp, "train", n_train, random.Random(f"{seed}-train"), image_sizes, text_fraction, describe_fraction
        )
        evals, _ = _write_split(
            tmp, "eval", n_eval, random.Random(f"{seed}-eval"), image_sizes, text_fraction, describe_fraction
        )
        for name, data in (("train.json", train), ("eval.json", evals), ("pretrain.json", pretrain)):
            (tmp / name).write_text(json.dumps(data))
        train_demo_tokenizer(corpus_texts(train + evals), tmp / "tokenizer")
        (tmp / "COMPLETE.json").write_text(json.dumps(_fingerprint(**params)))
        _move_into_place(tmp, root, stale, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)
