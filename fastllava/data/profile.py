"""Modelled token-length profiles of LLaVA-1.5's training data, for packing and attention benchmarks.

`mix665k` follows llava_v1_5_mix665k.json (stage 2): the source counts are those of the LLaVA repository
(they sum to 665,298); turn counts and question/answer lengths per source are assumptions written next
to each source, in LLaMA/Vicuna tokens, rendered with the vicuna_v1 template. `pretrain558k` is
LCS-558K (stage 1, `plain` template): one image and one short BLIP caption per sample.

A sample's length is what the model processes: BOS + system prompt + per round (question + answer +
template overhead) + num_image_tokens + 1 ("<image>\n") per image, then truncated to model_max_length
as the dataset does. Real datasets: measure with `python -m fastllava.data.stats --data FILE`.
Everything is drawn from numpy's PCG64 with a fixed seed: same arguments, same arrays.

AnyRes (LLaVA-NeXT): an image's token count depends on its size, so with `anyres` (the model's grid,
batch.AnyResGrid) every image also draws a (height, width) from its source's IMAGE_SIZES and counts
anyres.num_tokens(size) tokens instead of num_image_tokens. The sizes are a documented approximation
(IMAGE_SIZES), not measurements; they are drawn from their own streams, so the text lengths are the same
with and without AnyRes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# vicuna_v1 with a LLaMA tokenizer: BOS + system prompt and its trailing space ~ 1 + 34 tokens; per round
# "USER: " ~ 3, " ASSISTANT:" ~ 5, "</s>" 1.
SYSTEM_TOKENS = 35
ROUND_OVERHEAD = 9
# LLaVA-1.5's response-format prompts, appended to short-answer questions:
SHORT_ANSWER_PROMPT = 12  # "\nAnswer the question using a single word or phrase."
MC_PROMPT = 14  # "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Source:
    """One source of a training mix and the assumptions that model its lengths."""

    name: str
    count: int
    has_image: bool
    rounds_mean: float  # rounds (question + answer) per sample: 1 + Poisson(rounds_mean - 1), clipped
    rounds_max: int
    question_median: float  # tokens per question (lognormal), format prompts included
    answer_median: float  # tokens per answer (lognormal)
    sigma: float = 0.5  # lognormal shape of both


# (name, count from the LLaVA repository) + assumptions (why, in the comment).
MIX665K = (
    # LLaVA-Instruct-158K: conversation_58k (multi-turn, ~3 rounds, answers ~60 tokens), detail_23k (one
    # long description ~130), complex_reasoning_77k (one question ~25, answer ~120). Split by those sizes.
    Source("llava_instruct_conv", 56_681, True, 3.0, 10, 12, 60, 0.6),
    Source("llava_instruct_detail", 23_240, True, 1.0, 1, 12, 130, 0.35),
    Source("llava_instruct_complex", 77_791, True, 1.0, 1, 25, 120, 0.45),
    # ShareGPT (text-only, 40,688): long multi-turn chats; answers ~250 tokens with a heavy tail, so a good
    # share reaches model_max_length.
    Source("sharegpt", 40_688, False, 3.0, 20, 40, 250, 1.0),
    # VQAv2: 443K questions over 82,783 images grouped per image: ~5.4 short QA rounds, 1-2 word answers.
    Source("vqav2", 82_783, True, 5.4, 20, 8 + SHORT_ANSWER_PROMPT, 2, 0.35),
    # GQA: ~943K balanced questions over 72,140 images: ~13 rounds per image, one-word answers.
    Source("gqa", 72_140, True, 13.0, 40, 12 + SHORT_ANSWER_PROMPT, 2, 0.35),
    # OKVQA: ~1 question per image, short answers.
    Source("okvqa", 8_998, True, 1.0, 3, 10 + SHORT_ANSWER_PROMPT, 2, 0.35),
    # OCR-VQA: ~5 questions per book cover (title, author, genre, yes/no), answers up to a title (~6).
    Source("ocrvqa", 80_000, True, 5.0, 12, 7 + SHORT_ANSWER_PROMPT, 6, 0.6),
    # A-OKVQA multiple choice: question ~15 + four options ~25 + format prompt; one-letter answer.
    Source("aokvqa", 66_160, True, 1.0, 1, 40 + MC_PROMPT, 1, 0.25),
    # TextCaps: "Provide a one-sentence caption for the provided image." (~12) -> a ~14-token caption.
    Source("textcaps", 21_953, True, 1.0, 1, 12, 14, 0.3),
    # RefCOCO/+/g: a few rounds per image, half "expression -> box" (answer "[0.12, 0.34, 0.56, 0.78]"
    # ~25 tokens with split digits), half "box -> short description"; means q ~28, a ~15.
    Source("refcoco", 48_447, True, 3.0, 10, 28, 15, 0.4),
    # Visual Genome region captions: ~8 rounds of "box -> short description" (question with box ~35).
    Source("vg", 86_417, True, 8.0, 20, 35, 6, 0.4),
)

PRETRAIN558K = (
    # LCS-558K (LAION/CC/SBU with BLIP captions): one image, a caption of ~10-15 words (~13 tokens).
    # plain template: BOS + image + caption + "\n"; no system prompt, no round overhead.
    Source("lcs558k", 558_128, True, 1.0, 1, 0, 13, 0.35),
)

# Image sizes (height, width) in pixels per image collection, with their shares: an APPROXIMATION written from
# what the collections publish about their images, not a measurement of the files (none were at hand):
# - COCO (LLaVA-Instruct, VQAv2, OK-VQA, A-OKVQA, RefCOCO): Flickr photos scaled to 640 px on the long side
#   (COCO's release); mostly 4:3 and 3:2, landscape about three times as often as portrait.
# - Visual Genome (GQA, VG): YFCC/COCO photos, mostly 800 x 600 and 500 x 375 / 500 x 333 (VG's image_data.json
#   gives per-image widths and heights; the shares here are assumed).
# - OCR-VQA: Amazon book-cover thumbnails, portrait about 2:3, about 500 px tall, some small ones.
# - TextCaps: OpenImages, scaled to 1024 px on the long side, mostly 4:3 and 3:2 landscape.
COCO_SIZES = (((480, 640), 0.45), ((427, 640), 0.20), ((640, 480), 0.15), ((640, 427), 0.10), ((360, 640), 0.05),
              ((640, 640), 0.05))
VG_SIZES = (((600, 800), 0.35), ((375, 500), 0.25), ((333, 500), 0.15), ((800, 600), 0.10), ((500, 375), 0.10),
            ((500, 500), 0.05))
OCR_SIZES = (((500, 331), 0.50), ((500, 400), 0.20), ((160, 107), 0.30))
OPENIMAGES_SIZES = (((768, 1024), 0.45), ((683, 1024), 0.30), ((1024, 768), 0.15), ((1024, 683), 0.10))
IMAGE_SIZES = {"llava_instruct_conv": COCO_SIZES, "llava_instruct_detail": COCO_SIZES,
               "llava_instruct_complex": COCO_SIZES, "vqav2": COCO_SIZES, "gqa": VG_SIZES, "okvqa": COCO_SIZES,
               "ocrvqa": OCR_SIZES, "aokvqa": COCO_SIZES, "textcaps": OPENIMAGES_SIZES, "refcoco": COCO_SIZES,
               "vg": VG_SIZES}

PROFILES = {"mix665k": (MIX665K, SYSTEM_TOKENS, ROUND_OVERHEAD), "pretrain558k": (PRETRAIN558K, 1, 1)}
# The data each LLaVA-1.5 training stage runs on: stage 1 (align) the 558K captions, stage 2 (finetune) the
# 665K instruction mix. The planner, the memory and FLOP plans and benchmarks/e2e.py read it from here.
STAGE_PROFILES = {"align": "pretrain558k", "finetune": "mix665k"}


def _proportional_counts(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n like `counts` (largest remainder), so a subset keeps the mix's proportions exactly."""
    exact = counts * (n / counts.sum())
    out = np.floor(exact).astype(np.int64)
    rest = n - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def _lognormal_sums(rng: np.random.Generator, rounds: np.ndarray, median: float, sigma: float) -> np.ndarray:
    """Per sample, the sum of `rounds` independent lognormal token counts (each >= 1)."""
    if median <= 0:
        return np.zeros(len(rounds), dtype=np.int64)
    draws = np.maximum(1, np.rint(rng.lognormal(np.log(median), sigma, size=int(rounds.sum())))).astype(np.int64)
    owner = np.repeat(np.arange(len(rounds)), rounds)
    return np.bincount(owner, weights=draws, minlength=len(rounds)).astype(np.int64)


def _image_sizes(rng: np.random.Generator, source: str, count: int, anyres) -> tuple[np.ndarray, ...]:
    """(count, 2) sizes drawn from IMAGE_SIZES[source], and each one's tokens and tiles at the `anyres` grid."""
    if source not in IMAGE_SIZES:
        raise ValueError(f"source {source!r} has no image-size model (IMAGE_SIZES: {sorted(IMAGE_SIZES)}); "
                         "AnyRes needs one for every source with images")
    sizes, shares = zip(*IMAGE_SIZES[source])
    pick = rng.choice(len(sizes), size=count, p=np.array(shares) / sum(shares))
    tokens = np.array([anyres.num_tokens(hw) for hw in sizes], dtype=np.int64)
    tiles = np.array([anyres.num_tiles(hw) for hw in sizes], dtype=np.int64)
    return np.array(sizes, dtype=np.int64)[pick], tokens[pick], tiles[pick]


def sample_profile(profile: str = "mix665k", n: int | None = None, seed: int = 0, num_image_tokens: int = 576,
                   model_max_length: int | None = 2048, anyres=None) -> dict:
    """Like sample_lengths, also returning the source of each sample.

    anyres: the model's AnyRes grid (batch.AnyResGrid: num_tokens and num_tiles of a (height, width)), or None
    at fixed resolution. Returns {"lengths": (n,) int64, "has_image": (n,) bool, "source": (n,) int16,
    "names": [source names], "image_size": (n, 2) int64 (height, width; 0 without an image or without
    anyres), "tiles": (n,) int64 (images the tower encodes: 1 per image at fixed resolution), "image_tokens":
    (n,) int64 (the sample's visual tokens, included in its length)}.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    sources, base, overhead = PROFILES[profile]
    counts = np.array([s.count for s in sources], dtype=np.int64)
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n}")
        counts = _proportional_counts(counts, n)
    lengths, has_image, source, sizes, tiles, visual = [], [], [], [], [], []
    for k, (src, count) in enumerate(zip(sources, counts.tolist())):
        # one stream per source, so a source's samples do not depend on the others' draws
        rng = np.random.Generator(np.random.PCG64([seed, k]))
        rounds = np.minimum(1 + rng.poisson(src.rounds_mean - 1.0, size=count), src.rounds_max)
        text = (base + rounds * overhead + _lognormal_sums(rng, rounds, src.question_median, src.sigma)
                + _lognormal_sums(rng, rounds, src.answer_median, src.sigma))
        size, tokens, tile = np.zeros((count, 2), dtype=np.int64), np.full(count, num_image_tokens), np.ones(count)
        if src.has_image and anyres is not None:  # a stream of its own: the text draws above do not change
            size, tokens, tile = _image_sizes(np.random.Generator(np.random.PCG64([seed, k, 1])), src.name, count,
                                              anyres)
        if src.has_image:
            text = text + tokens + (1 if profile == "mix665k" else 0)  # "<image>\n" vs "<image>"
        sizes.append(size)
        tiles.append(tile.astype(np.int64) * src.has_image)
        visual.append(tokens * src.has_image)
        lengths.append(text)
        has_image.append(np.full(count, src.has_image))
        source.append(np.full(count, k, dtype=np.int16))
    lengths_n = np.concatenate(lengths).astype(np.int64)
    if model_max_length is not None:
        lengths_n = np.minimum(lengths_n, model_max_length)
    order = np.random.Generator(np.random.PCG64([seed, len(sources)])).permutation(len(lengths_n))
    return {"lengths": lengths_n[order], "has_image": np.concatenate(has_image)[order],
            "source": np.concatenate(source)[order], "names": [s.name for s in sources],
            "image_size": np.concatenate(sizes)[order], "tiles": np.concatenate(tiles)[order],
            "image_tokens": np.concatenate(visual).astype(np.int64)[order]}


def sample_lengths(profile: str = "mix665k", n: int | None = None, seed: int = 0, num_image_tokens: int = 576,
                   model_max_length: int | None = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Modelled sample lengths of a LLaVA training set, in a shuffled order.

    profile: "mix665k" (stage 2) or "pretrain558k" (stage 1). n: number of samples, split over the
    sources in the full set's proportions (None: the full count, 665,298 or 558,128).
    Returns lengths (n,) int64 (tokens after image expansion, <= model_max_length) and has_image (n,) bool.
    """
    out = sample_profile(profile, n, seed, num_image_tokens, model_max_length)
    return out["lengths"], out["has_image"]
