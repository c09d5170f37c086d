"""Templates and label masks against hand-written expectations and an independent prefix-tokenization oracle,
on a LLaMA-like SentencePiece tokenizer and a byte-level BPE; image-aware truncation."""

import numpy as np
import pytest
import torch

from fastllava.batch import IGNORE_INDEX
from fastllava.data.files import SampleError
from fastllava.data.templates import VICUNA_SYSTEM, get_template
from fastllava.data.tokenize import (Fit, batch_lengths, encode_sample, expanded_length, prepare_tokenizer,
                                     tokenize_conversation)

TOKENIZERS = ["llama_tok", "bpe_tok"]


def conv(*pairs):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(pairs)]


def label_runs(tok, labels):
    """Decoded text of each maximal run of label tokens."""
    labels = labels.tolist()
    runs, cur = [], []
    for x in labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def assert_runs(runs, answers, end):
    """The separator space before an answer is merged into its first token: a run reads
    answer + end, or the same with that one leading space (decoders differ in stripping it)."""
    assert len(runs) == len(answers), runs
    for run, answer in zip(runs, answers):
        assert run in (answer + end, " " + answer + end), (run, answer)


def test_vicuna_prompt_string_is_llavas():
    turns = conv("What is this?\n<image>", "A cat.", "And now?", "Still a cat.")
    r = get_template("vicuna_v1").render(turns)
    expected = (VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                "USER: And now? ASSISTANT: Still a cat.</s>")
    assert r.text == expected and r.num_images == 1
    assert [r.text[a:b] for a, b in r.answer_spans] == [" A cat.</s>", " Still a cat.</s>"]
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                             "gives helpful, detailed, and polite answers to the user's questions.")


def test_plain_prompt_string_is_llavas():
    r = get_template("plain").render(conv("Describe this photo.\n<image>", "A red bus."))
    assert r.text == "<image>A red bus.\n" and [r.text[a:b] for a, b in r.answer_spans] == ["A red bus.\n"]
    with pytest.raises(SampleError, match="one human and one gpt"):
        get_template("plain").render(conv("<image>q", "a", "q2", "a2"))
    with pytest.raises(SampleError, match="needs an image"):
        get_template("plain").render(conv("q", "a"))
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("llama_3")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_vicuna_multiturn_masks_read_as_the_answers(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    answers = ["A cat sitting on a red sofa.", " \nYes, there is a small dog.", "Café 日本語 🙂 </s> done",
               "Two."]
    turns = conv("<image>\nWhat is in the image?", answers[0], "Is there a dog?", answers[1],
                 "Unicode? </s> in a question", answers[2], "How many?", answers[3])
    ids, labels = tokenize_conversation(turns, tok, "vicuna_v1")
    img = tok.convert_tokens_to_ids("<image>")
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape
    assert int((ids == img).sum()) == 1 and labels[ids == img].eq(IGNORE_INDEX).all()
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    assert_runs(label_runs(tok, labels), answers, "</s>")
    # the model input is the whole prompt, tokenized once
    assert tok.decode(ids, skip_special_tokens=False).replace("<s>", "").strip().startswith("A chat between")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_text_only_and_plain_masks(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ids, labels = tokenize_conversation(conv("Write a poem about the sea.", "The sea is wide,\nthe sea is deep."),
                                        tok, "vicuna_v1")
    assert tok.convert_tokens_to_ids("<image>") not in ids.tolist()
    assert_runs(label_runs(tok, labels), ["The sea is wide,\nthe sea is deep."], "</s>")
    # plain: exact positions by hand: BOS and the image token are ignored, everything after is trained on
    ids, labels = tokenize_conversation(conv("Describe.\n<image>", "A cat on a sofa"), tok, "plain")
    assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids("<image>")
    assert labels[:2].tolist() == [IGNORE_INDEX, IGNORE_INDEX] and torch.equal(labels[2:], ids[2:])
    assert tok.decode(ids[2:]).lstrip(" ") == "A cat on a sofa\n"


def oracle_labels(tok, text, spans):
    """Independent of offsets (LLaVA-style counting): an answer's tokens start where the tokenization of the
    prompt up to the answer ends, minus its trailing separator-space token (merged into the answer's first
    token in the full prompt), and end where the tokenization up to the end of "</s>" ends."""
    full = tok(text)["input_ids"]
    labels = [IGNORE_INDEX] * len(full)
    for a, b in spans:
        assert text[a] == " "  # the span opens with the separator space
        head = tok(text[: a + 1])["input_ids"]  # LLaVA's parts[0]: "... ASSISTANT: "
        assert tok.convert_ids_to_tokens(head[-1]) in ("▁", "Ġ")  # the separator space alone
        head = head[:-1]
        upto = tok(text[:b])["input_ids"]
        assert full[: len(head)] == head and full[: len(upto)] == upto  # prefixes are stable here
        labels[len(head) : len(upto)] = full[len(head) : len(upto)]
    return full, labels


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_masks_match_prefix_oracle_on_ordinary_samples(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    samples = [
        conv("What color is the car?", "Blue.", "How many people are there?", "Two."),
        conv("Describe the image in detail.", "The photo shows a busy street with cars and people.",
             "Is it busy?", "Yes, very busy."),
        conv("Answer the question using a single word or phrase.", "Sea"),
    ]
    lone_separator_trained = 0
    for turns in samples:
        r = get_template("vicuna_v1").render(turns)
        ids, labels = tokenize_conversation(turns, tok, "vicuna_v1")
        full, expected = oracle_labels(tok, r.text, r.answer_spans)
        assert ids.tolist() == full
        assert labels.tolist() == expected
        tokens = tok.convert_ids_to_tokens(full)
        lone_separator_trained += sum(t in ("▁", "Ġ") and p == ":" and lab != IGNORE_INDEX
                                      for p, t, lab in zip(tokens, tokens[1:], labels.tolist()[1:]))
    # the awkward case (answer's first word has no merged-space token) occurs and is trained on
    assert lone_separator_trained > 0


def test_tokenizer_without_image_token_is_refused(llama_tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tok_dir), use_fast=True)
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        tokenize_conversation(conv("<image>\nq", "a"), tok, "vicuna_v1")
    ids = prepare_tokenizer(tok)
    assert ids == prepare_tokenizer(tok)  # idempotent
    assert tok.convert_tokens_to_ids("<image>") == ids.image_token_id == len(tok) - 1
    assert ids.pad_token_id == tok.unk_token_id  # LLaVA v1: pad = unk, no new embedding row
    with pytest.raises(SampleError, match="roles"):
        tokenize_conversation(conv("q", "a", "q2"), tok, "vicuna_v1")


# ------------------------------------------------------------------------------------------ truncation


def multi_image_turns():
    return conv("<image>\nWhat is in the first image?", "A cat sitting on a red sofa.",
                "<image>\nAnd in this one?", "A small dog next to the window.", "Is there a dog?", "Yes.")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_truncation_never_cuts_an_image(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    t = get_template("vicuna_v1")
    img, K = tok.convert_tokens_to_ids("<image>"), 50
    full = encode_sample(multi_image_turns(), tok, t, Fit(img, K, 10**6))
    assert full.num_images == 2 and not full.truncated
    first_label = int(np.flatnonzero(full.labels.numpy() != IGNORE_INDEX)[0])
    for max_len in range(first_label + K, full.length + 3):
        enc = encode_sample(multi_image_turns(), tok, t, Fit(img, K, max_len))
        cut = len(enc.input_ids)
        assert torch.equal(enc.input_ids, full.input_ids[:cut]) and torch.equal(enc.labels, full.labels[:cut])
        assert enc.length == expanded_length(enc.input_ids.numpy(), img, K) <= max_len
        assert enc.num_images == int((enc.input_ids == img).sum())
        assert enc.truncated == (max_len < full.length)
        if enc.truncated:
            # maximal: the next token would not fit, and only an image token costs more than one
            nxt = K if int(full.input_ids[cut]) == img else 1
            assert enc.length + nxt > max_len
            assert enc.length == max_len or int(full.input_ids[cut]) == img
    with pytest.raises(SampleError, match="overlong"):
        encode_sample(multi_image_turns(), tok, t, Fit(img, K, full.length - 1, "reject"))
    with pytest.raises(SampleError, match="no_labels"):
        encode_sample(multi_image_turns(), tok, t, Fit(img, K, first_label + 1))


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_batch_lengths_match_encode_sample(request, tok_name):
    llama_tok = request.getfixturevalue(tok_name)
    t = get_template("vicuna_v1")
    img, K = llama_tok.convert_tokens_to_ids("<image>"), 30
    samples = [multi_image_turns(), conv("Hi", "Hello."), conv("<image>\nq", "a " * 40), multi_image_turns()]
    for max_len, overlong in [(10**4, "truncate"), (90, "truncate"), (90, "reject")]:
        lengths, truncated, errors = batch_lengths(samples, llama_tok, t, Fit(img, K, max_len, overlong))
        for i, turns in enumerate(samples):
            try:
                enc = encode_sample(turns, llama_tok, t, Fit(img, K, max_len, overlong))
                assert lengths[i] == enc.length and truncated[i] == enc.truncated and i not in errors
            except SampleError as e:
                assert lengths[i] == 0 and errors[i].reason == e.reason
    assert set(errors) and all(e.reason == "overlong" for e in errors.values())
