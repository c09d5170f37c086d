"""Tokenization exactly as LLaVA's `tokenizer_image_token`, label masking from character offsets,
image-aware truncation, tokenizer setup.

The rule (LLaVA's llava/mm_utils.py `tokenizer_image_token`, used by preprocess_plain and, for samples with
an image, preprocess_v1, and by LLaVA's inference code): the rendered prompt (templates.py) is split
at each "<image>" tag and every text chunk is tokenized ON ITS OWN, with the tokenizer's special tokens.
Chunk 0 is kept as the tokenizer returns it (BOS first for LLaMA, even when the chunk is empty, as in
plain's "<image>caption\n"); every later chunk loses the BOS the tokenizer put in front of it; one image
token goes between consecutive chunks. A tokenizer that inserts no BOS (a byte-level BPE without one) keeps
every chunk whole (LLaVA's offset 0). Why it matters: each chunk is a fresh SentencePiece input, so the
text after an image gets the dummy-prefix "▁": "<image>\nWhat" -> IMG ▁ <0x0A> What, where one call over
the whole prompt would give IMG <0x0A> What. A checkpoint trained by LLaVA has only ever seen the former,
so fastllava trains AND prompts (tokenize_prompt) with the same chunked rule, in one function
(`tokenize_texts`) that every path calls: the per-sample path with offsets, `batch_lengths` (the lengths
the packer plans with) without, both batching all chunks of all texts into one tokenizer call.

Labels come from the template's answer spans via the fast tokenizer's offset mapping (each chunk's offsets
shifted by the chunk's start in the rendered text), never from re-tokenizing pieces and counting (LLaVA's
approach, which drifts when a token straddles a piece boundary and then drops the whole sample as a
"tokenization mismatch"; here no sample is ever dropped for that).

The rule: token t with character span [s, e) carries a loss iff it overlaps an answer span [a, b):
s < b and max(e, s + 1) > a (a zero-width token counts as sitting at s). Consequences:
  * SentencePiece folds the separator space into the answer's first token ("ASSISTANT:" + "▁Yes"):
    "▁Yes" spans " Yes", overlaps the answer, and is trained on: the reference's mask (it tokenizes
    "...ASSISTANT: " and subtracts the trailing "▁" for exactly this reason).
  * Where the answer's first character has no merged-space token (a digit, "\n"), the lone "▁" spans
    exactly the separator, which opens the span: trained on, as the reference does (its subtraction
    of the trailing "▁" leaves that token in the answer).
  * "</s>" closing an answer lies inside its span and is trained on; "USER" after it is not.
  * A chunk's dummy-prefix "▁" spans the chunk's first character: in vicuna_v1 that is the "\n" after
    the image (a question, no loss); in plain it is the caption's first character (loss, as in LLaVA,
    which masks only BOS and the image token there).
  * Tokens the tokenizer inserts (BOS: zero-width and special) and image tokens never carry a loss.
Labels are not shifted: labels[i] is input_ids[i] or IGNORE_INDEX.

Special-token strings inside the content (a literal "</s>" in an answer) are parsed as special tokens, as
the reference's tokenizer calls parse them; masks stay right because they follow offsets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
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
    _check_sentencepiece_needs(path)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True, **kwargs)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: got a slow tokenizer ({type(tokenizer).__name__}); a fast one is needed "
                         "for offset mappings (add tokenizer.json, or a tokenizer.model transformers converts)")
    prepare_tokenizer(tokenizer)
    return tokenizer


def _check_sentencepiece_needs(path: str) -> None:
    """A SentencePiece-only directory (tokenizer.model, no tokenizer.json: Vicuna-v1.5's) is converted by
    transformers only with sentencepiece and protobuf installed (runtime dependencies of fastllava); without
    them transformers' error talks about tiktoken, so name what is missing instead."""
    has = {name: os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer.model")}
    if has["tokenizer.json"] or not has["tokenizer.model"]:
        return
    missing = [package for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))
               if not _importable(module)]
    if missing:
        raise ValueError(f"{path}: a tokenizer.model without tokenizer.json needs {' and '.join(missing)}, "
                         f"which fastllava depends on but are not installed: pip install {' '.join(missing)}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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


# Bumped whenever the rule that turns a rendered prompt into ids changes (1: LLaVA's per-chunk tokenization
# around images), so caches keyed by tokenizer_fingerprint never serve lengths of the old rule.
_TOKENIZATION_RULE = "llava-image-chunks-1"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary, merges, normalization or added tokens change, or the tokenization
    rule of this module does (for caches of lengths)."""
    state = _TOKENIZATION_RULE + "\n" + tokenizer.backend_tokenizer.to_str()
    return hashlib.sha1(state.encode("utf-8")).hexdigest()[:16]


def _check_template_tokens(tokenizer, template: Template) -> None:
    for token in template.required_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"template {template.name!r} needs {token!r} as one token, and this tokenizer splits it "
                             f"into {len(ids)} tokens; use a tokenizer that has it as a special token")


# ------------------------------------------------------------------------------------------ tokenization


def _labels_from_spans(ids_L: np.ndarray, offsets_L2: np.ndarray, spans, special_ids) -> np.ndarray:
    start, end = offsets_L2[:, 0], offsets_L2[:, 1]
    train = np.zeros(len(ids_L), dtype=bool)
    for a, b in spans:
        train |= (start < b) & (np.maximum(end, start + 1) > a)
    inserted = (start == end) & np.isin(ids_L, special_ids)
    train &= ~inserted
    return np.where(train, ids_L, IGNORE_INDEX)


def _encode_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts. The tokenizers backend's encode_batch_fast skips offset tracking and
    transformers' per-encoding conversion: 1.7x faster than tokenizer(texts) on 3000 vicuna prompts
    (2-core CPU). It is used only where the backend carries no truncation or padding of its own and gives
    the same ids as tokenizer() on the first texts."""
    backend = tokenizer.backend_tokenizer  # a fast tokenizer (load_tokenizer); encode_batch_fast: tokenizers >= 0.20
    probe = texts[:4]
    if (backend.truncation is None and backend.padding is None
            and [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=True)]
            == tokenizer(probe, add_special_tokens=True)["input_ids"]):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def tokenize_texts(texts: Sequence[str], tokenizer, img_id: int, *, offsets: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """LLaVA's tokenizer_image_token on each text (the rule in the module docstring); THE one place
    where prompt text becomes ids. All chunks of all texts go through one batched tokenizer call.

    texts: rendered prompts with IMAGE_TAG where images go. img_id: the id put in place of each tag.
    Returns, per text, ids (L,) int64 and, with offsets=True, offsets (L, 2) int64: [start, end) character
    spans in the text (chunk offsets shifted by the chunk's start; an image token spans its tag; the BOS
    of chunk 0 stays zero-width at 0); without offsets (the faster path for lengths) None.
    """
    chunks: list[str] = []
    starts: list[int] = []
    n_chunks: list[int] = []
    for text in texts:
        pos = 0
        pieces = text.split(IMAGE_TAG)
        for piece in pieces:
            chunks.append(piece)
            starts.append(pos)
            pos += len(piece) + len(IMAGE_TAG)
        n_chunks.append(len(pieces))
    # The tokenization of "" is exactly what the tokenizer inserts; it rides in the same call. A tokenizer
    # that inserts BOS puts one in front of every chunk; LLaVA keeps chunk 0's and drops the others
    # (its offset 1); one inserting none keeps every chunk whole (offset 0). LLaVA decides from chunk 0's
    # first id, which a literal "<s>" opening the text would also satisfy; deciding from "" does not.
    chunks.append("")
    if offsets:
        enc = tokenizer(chunks, return_offsets_mapping=True, add_special_tokens=True)
        chunk_ids, chunk_offsets = enc["input_ids"], enc["offset_mapping"]
    else:
        chunk_ids, chunk_offsets = _encode_ids(tokenizer, chunks), None
    inserted = chunk_ids[-1]
    bos = tokenizer.bos_token_id
    drop_bos = bos is not None and len(inserted) > 0 and inserted[0] == bos

    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    c = 0
    for n in n_chunks:
        ids: list[int] = []
        offs: list[np.ndarray] = []
        for j in range(c, c + n):
            skip = 1 if j > c and drop_bos and chunk_ids[j][:1] == [bos] else 0
            if j > c:
                ids.append(img_id)
                if offsets:  # the image token spans its tag, which ends where this chunk starts
                    offs.append(np.array([[starts[j] - len(IMAGE_TAG), starts[j]]], dtype=np.int64))
            ids.extend(chunk_ids[j][skip:])
            if offsets:  # fromiter over the flattened pairs: 2x faster than asarray of a list of tuples
                pairs = chunk_offsets[j][skip:]
                flat = np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs))
                offs.append(flat.reshape(-1, 2) + starts[j])
        c += n
        out.append((np.asarray(ids, dtype=np.int64), np.concatenate(offs) if offsets else None))
    return out


def tokenize_rendered_many(rendered: Sequence[Rendered], tokenizer, img_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """input_ids (L,) int64 and labels (L,) int64 of each rendered prompt, in one batched call
    (tokenize_texts): tokens inside its answer spans keep their id as label, the others get IGNORE_INDEX
    (so do image tokens and the tokenizer's inserted specials)."""
    encoded = tokenize_texts([r.text for r in rendered], tokenizer, img_id, offsets=True)
    out = []
    for r, (ids_L, offsets_L2) in zip(rendered, encoded):
        labels_L = _labels_from_spans(ids_L, offsets_L2, r.answer_spans, tokenizer.all_special_ids)
        is_image = ids_L == img_id
        labels_L[is_image] = IGNORE_INDEX
        if int(is_image.sum()) != r.num_images:  # a text chunk tokenized to img_id: a wrong img_id
            raise ValueError(f"prompt has {r.num_images} {IMAGE_TAG} tags but tokenizes to "
                             f"{int(is_image.sum())} image tokens; call prepare_tokenizer(tokenizer) first")
        out.append((ids_L, labels_L))
    return out


def tokenize_rendered(rendered: Rendered, tokenizer, img_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokenize_rendered_many of one prompt."""
    return tokenize_rendered_many([rendered], tokenizer, img_id)[0]


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


def tokenize_prompt(turns: Sequence[dict], tokenizer, template: str | Template) -> list[int]:
    """Ids of a generation prompt: turns [{"from": "human"|"gpt", "value": str}, ...] ending with a human
    turn, rendered by template.render_prompt (up to where the model starts answering, LLaVA's
    conv.get_prompt() with the last assistant message None) and tokenized as training does: BOS first,
    ONE image token per image. Returns the ids as a list of ints (L,).

    The ids equal the training input_ids of the same turns plus an answer, cut before that answer's first
    label token: the template's loss span opens at the separator space, so the prompt stops before it
    and the tokens up to it are the same in both (for vicuna_v1 the prompt ends "ASSISTANT:", ":" is the
    last token both ways, and the space travels with the answer's first token, "▁Yes" or a lone "▁",
    which the model generates; LLaVA's own prompts end in "ASSISTANT:" and its masks train "▁Yes" too).
    Raises SampleError for turns the template cannot render.
    """
    template = get_template(template)
    _check_template_tokens(tokenizer, template)
    text = template.render_prompt(turns)
    ((ids_L, _),) = tokenize_texts([text], tokenizer, image_token_id(tokenizer))
    return ids_L.tolist()


# -------------------------------------------------------------------------------------------- truncation


def image_costs(ids_L: np.ndarray, img_id: int, image_tokens) -> np.ndarray:
    """(L,) int64 positions each token becomes: 1 for text; an image token its image's placeholders.
    image_tokens: an int (every image the same: fixed resolution) or the count of each image in order (AnyRes:
    each image's own, from its size); a prefix of a sample's ids uses the first counts."""
    is_image = ids_L == img_id
    cost_L = np.ones(len(ids_L), dtype=np.int64)
    if np.ndim(image_tokens) == 0:
        cost_L[is_image] = int(image_tokens)
        return cost_L
    counts = np.asarray(image_tokens, dtype=np.int64)
    n = int(is_image.sum())
    if n > len(counts):
        raise ValueError(f"{n} image tokens but token counts for {len(counts)} images")
    cost_L[is_image] = counts[:n]
    return cost_L


def expanded_length(ids_L: np.ndarray, img_id: int, num_image_tokens) -> int:
    """Tokens the model processes: each image token becomes its image's placeholders (num_image_tokens: an
    int, or one count per image: image_costs)."""
    return int(image_costs(ids_L, img_id, num_image_tokens).sum())


def truncation_point(ids_L: np.ndarray, img_id: int, num_image_tokens, max_length: int) -> int:
    """Largest k with expanded_length(ids_L[:k]) <= max_length; an image is all or nothing, so a cut
    that would split an image's positions falls just before its token."""
    cost_L = image_costs(ids_L, img_id, num_image_tokens)
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


def encode_sample(turns: Sequence[dict], tokenizer, template: Template, fit: Fit, image_tokens=None) -> Encoded:
    """Render, tokenize, mask and fit one (validated) conversation into fit.model_max_length. image_tokens:
    each image's placeholder count (AnyRes), None for fit.num_image_tokens each.

    Raises SampleError: "template" (cannot render), "overlong" (too long and overlong="reject"),
    "no_labels" (nothing left to train on after truncation).
    """
    return fit_sample(*tokenize_rendered(template.render(turns), tokenizer, fit.img_id), fit, image_tokens)


def fit_sample(ids_L: np.ndarray, labels_L: np.ndarray, fit: Fit, image_tokens=None) -> Encoded:
    """The second half of encode_sample: truncate ids and labels to fit.model_max_length (or reject), and
    reject a sample left without a label token. Raises SampleError ("overlong", "no_labels")."""
    img_id, model_max_length = fit.img_id, fit.model_max_length
    num_image_tokens = fit.num_image_tokens if image_tokens is None else image_tokens
    length = expanded_length(ids_L, img_id, num_image_tokens)
    truncated = length > model_max_length
    if truncated:
        _check_overlong_policy(length, fit)
        cut = truncation_point(ids_L, img_id, num_image_tokens, model_max_length)
        ids_L, labels_L = ids_L[:cut], labels_L[:cut]
        length = expanded_length(ids_L, img_id, num_image_tokens)
    if not (labels_L != IGNORE_INDEX).any():
        raise _no_labels(fit, truncated)
    return Encoded(torch.from_numpy(ids_L), torch.from_numpy(labels_L),
                   int((ids_L == img_id).sum()), length, truncated)


def _check_overlong_policy(length: int, fit: Fit) -> None:
    if fit.overlong == "reject":
        raise SampleError("overlong", f"{length} tokens after image expansion > model_max_length "
                                      f"{fit.model_max_length}")


def _no_labels(fit: Fit, truncated: bool) -> SampleError:
    why = f"after truncation to {fit.model_max_length} tokens" if truncated else "(empty answers)"
    return SampleError("no_labels", f"no token carries a loss {why}")


def _first_labels(rendered: Sequence[Rendered], ids: Sequence[np.ndarray], tokenizer, img_id: int) -> list[int | None]:
    """Index of the first label token of each sample whose whole ids are ids[k], found by tokenizing (with
    offsets, in one batched call) only its text up to the end of its first answer span. The tokens of that
    prefix up to its first label token must equal ids[k]'s: then they are the same tokens over the same
    characters, so the full tokenization has no label before that index and one at it. None where they
    differ (a merge across the prefix's end) or the prefix has no label: the caller tokenizes the whole text."""
    prefixes = []
    for r in rendered:
        text = r.text[: r.answer_spans[0][1]]
        prefixes.append(Rendered(text, r.answer_spans[:1], text.count(IMAGE_TAG)))
    out: list[int | None] = []
    for ids_L, (ids_P, labels_P) in zip(ids, tokenize_rendered_many(prefixes, tokenizer, img_id)):
        labelled = np.flatnonzero(labels_P != IGNORE_INDEX)
        first = int(labelled[0]) if len(labelled) else len(ids_L)
        out.append(first if first < len(ids_L) and np.array_equal(ids_P[: first + 1], ids_L[: first + 1]) else None)
    return out


def batch_lengths(turns_list: Sequence[Sequence[dict]], tokenizer, template: Template, fit: Fit,
                  image_tokens: Sequence[Sequence[int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, SampleError]]:
    """Lengths after image expansion and truncation of many conversations, as encode_sample would give,
    from one batched tokenizer call without offsets over every conversation. image_tokens: for each
    conversation, its images' placeholder counts (AnyRes); None for fit.num_image_tokens per image.

    An over-long sample's truncated length comes from the same ids; whether a label survives its cut is
    decided from the position of its first label token (_first_label: a tokenization of the text up to the
    end of the first answer only). Half the tokenization time of a mix665k-shaped file went to tokenizing
    the over-long samples (7% of them) a second time, whole and with offsets. Returns lengths (N,) int64
    (0 where rejected), truncated (N,) bool and {position: SampleError}."""
    lengths = np.zeros(len(turns_list), dtype=np.int64)
    truncated = np.zeros(len(turns_list), dtype=bool)
    errors: dict[int, SampleError] = {}
    rendered, where = [], []
    for i, turns in enumerate(turns_list):
        try:
            rendered.append(template.render(turns))
            where.append(i)
        except SampleError as e:
            errors[i] = e
    counts = [fit.num_image_tokens if image_tokens is None else image_tokens[i] for i in where]
    overlong: list[tuple[int, np.ndarray]] = []
    for k, (ids_L, _) in enumerate(tokenize_texts([r.text for r in rendered], tokenizer, fit.img_id)):
        length = expanded_length(ids_L, fit.img_id, counts[k])
        if length <= fit.model_max_length:
            lengths[where[k]] = length
            continue
        truncated[where[k]] = True
        try:
            _check_overlong_policy(length, fit)
            overlong.append((k, ids_L))
        except SampleError as e:
            errors[where[k]] = e
    undecided = []
    firsts = _first_labels([rendered[k] for k, _ in overlong], [ids_L for _, ids_L in overlong], tokenizer, fit.img_id)
    for (k, ids_L), first in zip(overlong, firsts):
        cut = truncation_point(ids_L, fit.img_id, counts[k], fit.model_max_length)
        if first is None:
            undecided.append(k)
        elif first < cut:
            lengths[where[k]] = expanded_length(ids_L[:cut], fit.img_id, counts[k])
        else:
            errors[where[k]] = _no_labels(fit, truncated=True)
    if undecided:
        for k, (ids_L, labels_L) in zip(undecided, tokenize_rendered_many([rendered[k] for k in undecided],
                                                                         tokenizer, fit.img_id)):
            try:
                lengths[where[k]] = fit_sample(ids_L, labels_L, fit, counts[k]).length
            except SampleError as e:
                errors[where[k]] = e
    return lengths, truncated, errors
