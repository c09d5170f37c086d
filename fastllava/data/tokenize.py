"""Tokenization and label masking from character offsets, image-aware truncation, tokenizer setup.

The rendered prompt (templates.py) is tokenized ONCE, exactly as the model reads it at inference, with
the tokenizer adding BOS as LLaMA does. Labels come from the template's answer spans via the fast
tokenizer's offset mapping, never from re-tokenizing pieces and counting (the reference's approach,
which drifts when a token straddles a piece boundary and then drops the whole sample as a "tokenization
mismatch"; here no sample is ever dropped for that).

The rule: token t with character span [s, e) carries a loss iff it overlaps an answer span [a, b):
s < b and max(e, s + 1) > a (a zero-width token counts as sitting at s). Consequences:
  * SentencePiece folds the separator space into the answer's first token ("ASSISTANT:" + "▁Yes"):
    "▁Yes" spans " Yes", overlaps the answer, and is trained on: the reference's mask (it tokenizes
    "...ASSISTANT: " and subtracts the trailing "▁" for exactly this reason).
  * A token lying wholly in the separator (a lone "▁" before an answer that starts with "\n") is not.
  * "</s>" closing an answer lies inside its span and is trained on; "USER" after it is not.
  * Tokens the tokenizer inserts (BOS: zero-width and special) and image tokens never carry a loss.
Labels are not shifted: labels[i] is input_ids[i] or IGNORE_INDEX.

Special-token strings inside the content (a literal "</s>" in an answer) are parsed as special tokens, as
the reference's single tokenizer call parses them; masks stay right because they follow offsets.

Known deviation from the reference's token ids (not masks): LLaVA tokenizes the text around each <image>
separately, so with a LLaMA tokenizer the text after an image gets a dummy-prefix "▁" ("<image>\nWhat" ->
IMG ▁ <0x0A> What); one call over the whole prompt gives IMG <0x0A> What. Train and infer with the same
function and the model sees one consistent format.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..batch import IGNORE_INDEX
from .files import IMAGE_TAG, SampleError, validate_turns
from .templates import Rendered, Template, get_template

OVERLONG_POLICIES = ("truncate", "reject")


# -------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike, *, model_max_length: int | None = None):
    """A fast tokenizer from a local directory (never the hub), prepared with `prepare_tokenizer`."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is not a local directory (hub downloads are not used)")
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True, **kwargs)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: got a slow tokenizer ({type(tokenizer).__name__}); a fast one is needed "
                         "for offset mappings (add tokenizer.json, or a tokenizer.model transformers converts)")
    prepare_tokenizer(tokenizer)
    return tokenizer


@dataclass(frozen=True)
class TokenizerIds:
    """The token ids a model needs from its tokenizer."""

    image_token_id: int
    pad_token_id: int
    vocab_size: int  # len(tokenizer) after additions: the model's embedding table must be at least this


def prepare_tokenizer(tokenizer) -> TokenizerIds:
    """Make `<image>` one special token and ensure a pad token; idempotent.

    The pad token follows LLaVA's v1 recipe where possible (pad = unk, so the vocabulary does not grow);
    only a tokenizer without unk gets a new "<pad>". Packed batches need padding only for static shapes.
    """
    from tokenizers import AddedToken

    if IMAGE_TAG not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    if tokenizer(IMAGE_TAG, add_special_tokens=False)["input_ids"] != [image_id]:
        raise ValueError(f"{IMAGE_TAG} does not tokenize to the single token {image_id}")
    return TokenizerIds(image_id, tokenizer.pad_token_id, len(tokenizer))


def image_token_id(tokenizer) -> int:
    """The id of `<image>`; ValueError if the tokenizer splits it (call prepare_tokenizer first)."""
    ids = tokenizer(IMAGE_TAG, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{IMAGE_TAG} is not a single token of this tokenizer (got {ids}); "
                         "call fastllava.data.prepare_tokenizer(tokenizer) first")
    return ids[0]


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary, merges, normalization or added tokens change (for caches)."""
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def _check_template_tokens(tokenizer, template: Template) -> None:
    for token in template.required_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"template {template.name!r} ends answers with {token!r}, which this tokenizer "
                             f"splits into {len(ids)} tokens; use a tokenizer that has it as a special token")


# ------------------------------------------------------------------------------------------ tokenization


def _labels_from_spans(ids_L: np.ndarray, offsets_L2: np.ndarray, spans, special_ids) -> np.ndarray:
    start, end = offsets_L2[:, 0], offsets_L2[:, 1]
    train = np.zeros(len(ids_L), dtype=bool)
    for a, b in spans:
        train |= (start < b) & (np.maximum(end, start + 1) > a)
    inserted = (start == end) & np.isin(ids_L, special_ids)
    train &= ~inserted
    return np.where(train, ids_L, IGNORE_INDEX)


def tokenize_rendered(rendered: Rendered, tokenizer, img_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids (L,) int64 and labels (L,) int64 of a rendered prompt: tokens inside its answer spans keep
    their id as label, the others get IGNORE_INDEX (so do image tokens and the tokenizer's inserted specials)."""
    enc = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
    ids_L = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets_L2 = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    labels_L = _labels_from_spans(ids_L, offsets_L2, rendered.answer_spans, tokenizer.all_special_ids)
    is_image = ids_L == img_id
    labels_L[is_image] = IGNORE_INDEX
    if int(is_image.sum()) != rendered.num_images:
        raise ValueError(f"prompt has {rendered.num_images} {IMAGE_TAG} tags but tokenizes to "
                         f"{int(is_image.sum())} image tokens; call prepare_tokenizer(tokenizer) first")
    return ids_L, labels_L


def tokenize_conversation(
    conversations: Sequence[dict], tokenizer, template: str | Template
) -> tuple[torch.Tensor, torch.Tensor]:
    """conversations: [{"from": "human"|"gpt", "value": str}, ...] with <image> tags in human turns.

    Returns input_ids (L,) int64 with ONE image token per image and labels (L,) int64 (IGNORE_INDEX
    where no loss, not shifted). Raises SampleError for a conversation the template cannot render.
    """
    template = get_template(template)
    validate_turns(conversations)
    _check_template_tokens(tokenizer, template)
    ids_L, labels_L = tokenize_rendered(template.render(conversations), tokenizer, image_token_id(tokenizer))
    return torch.from_numpy(ids_L), torch.from_numpy(labels_L)


# -------------------------------------------------------------------------------------------- truncation


def expanded_length(ids_L: np.ndarray, img_id: int, num_image_tokens: int) -> int:
    """Tokens the model processes: each image token becomes num_image_tokens positions."""
    return len(ids_L) + int((ids_L == img_id).sum()) * (num_image_tokens - 1)


def truncation_point(ids_L: np.ndarray, img_id: int, num_image_tokens: int, max_length: int) -> int:
    """Largest k with expanded_length(ids_L[:k]) <= max_length; an image is all or nothing, so a cut
    that would split an image's positions falls just before its token."""
    cost_L = np.where(ids_L == img_id, num_image_tokens, 1)
    return int(np.searchsorted(np.cumsum(cost_L), max_length, side="right"))


@dataclass
class Encoded:
    """One sample ready for packing."""

    input_ids: torch.Tensor  # (L,) int64, one image token per kept image
    labels: torch.Tensor  # (L,) int64, IGNORE_INDEX where no loss
    num_images: int  # images kept (truncation drops those after the cut)
    length: int  # after image expansion, <= model_max_length
    truncated: bool


@dataclass(frozen=True)
class Fit:
    """How a sample is fitted to the model: the image token, the positions one image occupies, the
    longest sample (after image expansion), and what to do with a longer one ("truncate" or "reject")."""

    img_id: int
    num_image_tokens: int
    model_max_length: int
    overlong: str = "truncate"


def encode_sample(turns: Sequence[dict], tokenizer, template: Template, fit: Fit) -> Encoded:
    """Render, tokenize, mask and fit one (validated) conversation into fit.model_max_length.

    Raises SampleError: "template" (cannot render), "overlong" (too long and overlong="reject"),
    "no_labels" (nothing left to train on after truncation).
    """
    img_id, num_image_tokens, model_max_length = fit.img_id, fit.num_image_tokens, fit.model_max_length
    rendered = template.render(turns)
    ids_L, labels_L = tokenize_rendered(rendered, tokenizer, img_id)
    length = expanded_length(ids_L, img_id, num_image_tokens)
    truncated = length > model_max_length
    if truncated:
        if fit.overlong == "reject":
            raise SampleError("overlong", f"{length} tokens after image expansion > model_max_length "
                                          f"{model_max_length}")
        cut = truncation_point(ids_L, img_id, num_image_tokens, model_max_length)
        ids_L, labels_L = ids_L[:cut], labels_L[:cut]
        length = expanded_length(ids_L, img_id, num_image_tokens)
    if not (labels_L != IGNORE_INDEX).any():
        why = f"after truncation to {model_max_length} tokens" if truncated else "(empty answers)"
        raise SampleError("no_labels", f"no token carries a loss {why}")
    return Encoded(torch.from_numpy(ids_L), torch.from_numpy(labels_L),
                   int((ids_L == img_id).sum()), length, truncated)


def _encode_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts. The tokenizers backend's encode_batch_fast skips offset tracking and
    transformers' per-encoding conversion: 1.7x faster than tokenizer(texts) on 3000 vicuna prompts
    (2-core CPU). It is used only where it gives the same ids as tokenizer() on the first texts."""
    fast = tokenizer.backend_tokenizer.encode_batch_fast  # tokenizers >= 0.20, a fast tokenizer (load_tokenizer)
    probe = texts[:4]
    if [e.ids for e in fast(probe, add_special_tokens=True)] == tokenizer(probe, add_special_tokens=True)["input_ids"]:
        return [e.ids for e in fast(texts, add_special_tokens=True)]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def batch_lengths(turns_list: Sequence[Sequence[dict]], tokenizer, template: Template,
                  fit: Fit) -> tuple[np.ndarray, np.ndarray, dict[int, SampleError]]:
    """Lengths after image expansion and truncation of many conversations, as encode_sample would give,
    with one batched tokenizer call (no offsets) for the common case; only over-long samples take the
    full path. Returns lengths (N,) int64 (0 where rejected), truncated (N,) bool and
    {position: SampleError}."""
    lengths = np.zeros(len(turns_list), dtype=np.int64)
    truncated = np.zeros(len(turns_list), dtype=bool)
    errors: dict[int, SampleError] = {}
    texts, where = [], []
    for i, turns in enumerate(turns_list):
        try:
            texts.append(template.render(turns).text)
            where.append(i)
        except SampleError as e:
            errors[i] = e
    if texts:
        encoded = _encode_ids(tokenizer, texts)
        for i, ids in zip(where, encoded):
            ids_L = np.asarray(ids, dtype=np.int64)
            length = expanded_length(ids_L, fit.img_id, fit.num_image_tokens)
            if length <= fit.model_max_length:
                lengths[i] = length
                continue
            truncated[i] = True
            try:
                lengths[i] = encode_sample(turns_list[i], tokenizer, template, fit).length
            except SampleError as e:
                errors[i] = e
    return lengths, truncated, errors
