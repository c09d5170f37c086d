"""Templates, token ids and label masks against hand-worked expectations, LLaVA's tokenizer_image_token rule
restated independently, and a prefix-tokenization oracle, on a LLaMA-like SentencePiece tokenizer and a
byte-level BPE; generation prompts; image-aware truncation and the batched length path."""

import random

import numpy as np
import pytest
import torch

from fastllava.batch import IGNORE_INDEX
from fastllava.data.files import SampleError
from fastllava.data.templates import VICUNA_SYSTEM, get_template
from fastllava.data.tokenize import (Fit, batch_lengths, encode_sample, expanded_length, load_tokenizer,
                                     prepare_tokenizer, tokenize_conversation, tokenize_prompt, tokenize_texts)

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


# ----------------------------------------------------------------------------- token ids worked by hand
#
# LLaVA's rule: split the rendered prompt at each "<image>", tokenize every chunk on its own (each call adds
# BOS), keep chunk 0's BOS, drop the BOS of every later chunk, put one image token between chunks. With
# SentencePiece each chunk is a fresh input, so the text after an image starts with the dummy-prefix "▁".
# The pieces below were worked out chunk by chunk (one plain tokenizer call per chunk shows each chunk's
# pieces); the fixture tokenizers are trained deterministically, so the lists are literal.

# VICUNA_SYSTEM, without the BOS of its chunk
LLAMA_SYSTEM = ["▁A", "▁c", "hat", "▁b", "etw", "een", "▁a", "▁c", "ur", "io", "us", "▁user", "▁and", "▁an",
                "▁a", "rt", "ifi", "ci", "al", "▁i", "nt", "ell", "i", "gen", "ce", "▁assistant", ".", "▁The",
                "▁assistant", "▁", "giv", "es", "▁", "he", "lp", "ful", ",", "▁detai", "led", ",", "▁and", "▁p",
                "ol", "ite", "▁an", "s", "wer", "s", "▁to", "▁the", "▁user", "'", "s", "▁questio", "ns", "."]
BPE_SYSTEM = ["A", "Ġchat", "Ġbetween", "Ġa", "Ġcurious", "Ġuser", "Ġand", "Ġan", "Ġartificial", "Ġintelligence",
              "Ġassistant", ".", "ĠThe", "Ġassistant", "Ġgives", "Ġhelpful", ",", "Ġdetailed", ",", "Ġand",
              "Ġpolite", "Ġanswers", "Ġto", "Ġthe", "Ġuser", "'s", "Ġquestions", "."]


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_plain_ids_by_hand_sentencepiece(llama_tok):
    tok = llama_tok
    # "<image>A red bus.\n": chunk 0 "" -> [<s>] (BOS even for an empty chunk); chunk 1 "A red bus.\n" ->
    # [<s>, ▁A, ▁, re, d, ▁b, us, .\n] without its <s>: the dummy prefix merges into "▁A".
    ids, labels = tokenize_conversation(conv("Describe.\n<image>", "A red bus."), tok, "plain")
    assert ids.tolist() == [1, 480, 271, 421, 265, 431, 316, 270, 353]
    assert pieces(tok, ids) == ["<s>", "<image>", "▁A", "▁", "re", "d", "▁b", "us", ".\n"]
    # LLaVA's preprocess_plain masks BOS and the image token; everything after, the "▁A" included, is trained
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 271, 421, 265, 431, 316, 270, 353]
    # one call over the whole text (the old rule) gives "A" without the dummy prefix
    assert pieces(tok, tok("<image>A red bus.\n")["input_ids"])[:3] == ["<s>", "<image>", "A"]
    # two images: the empty chunk between the tags loses its BOS and leaves nothing
    ids, labels = tokenize_conversation(conv("<image><image>Describe both.", "A red bus."), tok, "plain")
    assert pieces(tok, ids) == ["<s>", "<image>", "<image>", "▁A", "▁", "re", "d", "▁b", "us", ".\n"]
    assert labels[:3].tolist() == [IGNORE_INDEX] * 3 and torch.equal(labels[3:], ids[3:])
    # the generation prompt: the image tag(s) alone
    assert tokenize_prompt(conv("Describe.\n<image>"), tok, "plain") == [1, 480]
    assert tokenize_prompt(conv("<image><image>Describe both."), tok, "plain") == [1, 480, 480]


def test_plain_ids_by_hand_bytelevel(bpe_tok):
    tok = bpe_tok
    # no dummy prefix in a byte-level BPE: "A" opens the caption either way; BOS (id 0) from chunk 0
    ids, labels = tokenize_conversation(conv("Describe.\n<image>", "A red bus."), tok, "plain")
    assert ids.tolist() == [0, 537, 35, 476, 435, 16, 201]
    assert pieces(tok, ids) == ["<s>", "<image>", "A", "Ġred", "Ġbus", ".", "Ċ"]
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 35, 476, 435, 16, 201]
    assert tokenize_prompt(conv("Describe.\n<image>"), tok, "plain") == [0, 537]


def test_vicuna_ids_by_hand_sentencepiece(llama_tok):
    tok = llama_tok
    turns = conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "Yes.")
    ids, labels = tokenize_conversation(turns, tok, "vicuna_v1")
    # chunk 0: SYSTEM + " USER: " (the trailing space is a lone "▁");
    # chunk 1: "\nWhat is in the image? ASSISTANT: A cat.</s>USER: Is there a dog? ASSISTANT: Yes.</s>"
    # whose own "<s>" is dropped and whose dummy prefix is the "▁" before "\n".
    head = ["<s>"] + LLAMA_SYSTEM + ["▁USER", ":", "▁", "<image>", "▁", "\n", "W", "hat", "▁is", "▁in", "▁the",
                                     "▁image", "?", "▁ASSISTANT", ":"]
    answer1 = ["▁A", "▁c", "at", ".", "</s>"]
    turn2 = ["US", "ER", ":", "▁", "Is", "▁there", "▁a", "▁dog", "?", "▁ASSISTANT", ":"]
    answer2 = ["▁Y", "es", ".", "</s>"]
    assert pieces(tok, ids) == head + answer1 + turn2 + answer2
    trained = [False] * len(head) + [True] * len(answer1) + [False] * len(turn2) + [True] * len(answer2)
    assert (labels != IGNORE_INDEX).tolist() == trained
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    # one call over the whole prompt (the old rule) has no "▁" after the image
    one_call = pieces(tok, tok(get_template("vicuna_v1").render(turns).text)["input_ids"])
    assert one_call[len(LLAMA_SYSTEM) + 4 : len(LLAMA_SYSTEM) + 7] == ["<image>", "\n", "W"]


def test_vicuna_ids_by_hand_bytelevel(bpe_tok):
    tok = bpe_tok
    ids, labels = tokenize_conversation(conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "Yes."),
                                        tok, "vicuna_v1")
    # " USER: " ends chunk 0 as "Ġ" "USER" ":" "Ġ"; chunk 1 starts "\n" -> "Ċ" (no dummy prefix here)
    head = ["<s>"] + BPE_SYSTEM + ["Ġ", "USER", ":", "Ġ", "<image>", "Ċ", "What", "Ġis", "Ġin", "Ġthe", "Ġimage", "?",
                                   "ĠASSISTANT", ":"]
    answer1 = ["ĠA", "Ġcat", ".", "</s>"]
    turn2 = ["USER", ":", "ĠIs", "Ġthere", "Ġa", "Ġdog", "?", "ĠASSISTANT", ":"]
    answer2 = ["ĠYes", ".", "</s>"]
    assert pieces(tok, ids) == head + answer1 + turn2 + answer2
    trained = [False] * len(head) + [True] * len(answer1) + [False] * len(turn2) + [True] * len(answer2)
    assert (labels != IGNORE_INDEX).tolist() == trained


def two_image_prompt_turns():
    return conv("<image>\nWhat is in the first image?", "A cat.", "<image>\nAnd this one?")


def test_two_image_prompt_by_hand(llama_tok, bpe_tok):
    text = get_template("vicuna_v1").render_prompt(two_image_prompt_turns())
    assert text == (VICUNA_SYSTEM + " USER: <image>\nWhat is in the first image? ASSISTANT: A cat.</s>"
                    "USER: <image>\nAnd this one? ASSISTANT:")
    # three chunks: SYSTEM + " USER: " | "\nWhat is in the first image? ASSISTANT: A cat.</s>USER: " |
    # "\nAnd this one? ASSISTANT:"; chunks 1 and 2 lose their "<s>" and open with the dummy-prefix "▁"
    ids = tokenize_prompt(two_image_prompt_turns(), llama_tok, "vicuna_v1")
    assert pieces(llama_tok, ids) == (
        ["<s>"] + LLAMA_SYSTEM + ["▁USER", ":", "▁", "<image>"]
        + ["▁", "\n", "W", "hat", "▁is", "▁in", "▁the", "▁", "fi", "r", "s", "t", "▁image", "?", "▁ASSISTANT", ":",
           "▁A", "▁c", "at", ".", "</s>", "US", "ER", ":", "▁", "<image>"]
        + ["▁", "\n", "A", "n", "d", "▁t", "h", "is", "▁", "on", "e", "?", "▁ASSISTANT", ":"])
    assert ids[-15:] == [480, 421, 450, 441, 427, 431, 261, 430, 307, 421, 379, 422, 446, 349, 444]
    ids = tokenize_prompt(two_image_prompt_turns(), bpe_tok, "vicuna_v1")
    assert pieces(bpe_tok, ids) == (
        ["<s>"] + BPE_SYSTEM + ["Ġ", "USER", ":", "Ġ", "<image>"]
        + ["Ċ", "What", "Ġis", "Ġin", "Ġthe", "Ġ", "fi", "r", "s", "t", "Ġimage", "?", "ĠASSISTANT", ":",
           "ĠA", "Ġcat", ".", "</s>", "USER", ":", "Ġ", "<image>"]
        + ["Ċ", "A", "n", "d", "Ġt", "h", "is", "Ġon", "e", "?", "ĠASSISTANT", ":"])
    assert ids[-13:] == [537, 201, 35, 80, 70, 261, 74, 310, 437, 71, 33, 349, 28]


@pytest.fixture(scope="module")
def bpe_no_bos_tok(bpe_tok_dir, tmp_path_factory):
    """The byte-level BPE fixture with a post-processor that inserts nothing (no BOS)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(bpe_tok_dir / "tokenizer.json"))
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    path = tmp_path_factory.mktemp("bpe_no_bos")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    tok = load_tokenizer(path)
    assert tok("A cat")["input_ids"] == [35, 454] and tok("")["input_ids"] == []
    return tok


def test_tokenizer_without_bos_keeps_every_chunk_whole(bpe_no_bos_tok):
    tok = bpe_no_bos_tok
    # LLaVA's offset 0: chunk 0 does not start with BOS, so no chunk loses its first token
    ids, labels = tokenize_conversation(conv("Describe.\n<image>", "A red bus."), tok, "plain")
    assert pieces(tok, ids) == ["<image>", "A", "Ġred", "Ġbus", ".", "Ċ"]
    assert labels.tolist() == [IGNORE_INDEX, 35, 476, 435, 16, 201]
    ids = tokenize_prompt(two_image_prompt_turns(), tok, "vicuna_v1")
    assert pieces(tok, ids) == (
        BPE_SYSTEM + ["Ġ", "USER", ":", "Ġ", "<image>"]
        + ["Ċ", "What", "Ġis", "Ġin", "Ġthe", "Ġ", "fi", "r", "s", "t", "Ġimage", "?", "ĠASSISTANT", ":",
           "ĠA", "Ġcat", ".", "</s>", "USER", ":", "Ġ", "<image>"]
        + ["Ċ", "A", "n", "d", "Ġt", "h", "is", "Ġon", "e", "?", "ĠASSISTANT", ":"])
    turns = conv("<image>\nWhat is in the first image?", "A cat.", "<image>\nAnd this one?", "2 dogs.")
    ids, labels = tokenize_conversation(turns, tok, "vicuna_v1")
    assert ids.tolist() == llava_ids(tok, get_template("vicuna_v1").render(turns).text)
    assert_runs(label_runs(tok, labels), ["A cat.", "2 dogs."], "</s>")


def llava_ids(tok, text):
    """LLaVA's tokenizer_image_token restated (llava/mm_utils.py): one plain tokenizer call per text chunk
    between "<image>" tags; if chunk 0 starts with BOS, BOS once and the first id of every later chunk
    dropped; one image id between chunks."""
    img = tok.convert_tokens_to_ids("<image>")
    chunks = [tok(c)["input_ids"] for c in text.split("<image>")]
    offset = 1 if chunks[0][:1] == [tok.bos_token_id] else 0
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [img] + c[offset:]
    return ids


def oracle_labels(tok, text, spans):
    """Independent of offsets (LLaVA-style counting): an answer's tokens start where the tokenization of the
    prompt up to the answer ends, minus its trailing separator-space token (merged into the answer's first
    token in the full prompt), and end where the tokenization up to the end of "</s>" ends."""
    full = llava_ids(tok, text)
    labels = [IGNORE_INDEX] * len(full)
    for a, b in spans:
        assert text[a] == " "  # the span opens with the separator space
        head = llava_ids(tok, text[: a + 1])  # LLaVA's parts[0]: "... ASSISTANT: "
        assert tok.convert_ids_to_tokens(head[-1]) in ("▁", "Ġ")  # the separator space alone
        head = head[:-1]
        upto = llava_ids(tok, text[:b])
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
        conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "2 dogs."),
        conv("<image>\nWhat is in the first image?", "A cat.", "<image>\n<image>\nAnd these?", "\nTwo."),
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


WORDS = ("a cat sitting on a red sofa the assistant gives helpful detailed answers What color is car Blue "
         "How many people are there Two Café naïve 日本語 dog window 2 17 poem sea deep").split()


def random_conversations(n, seed=0):
    """vicuna_v1 conversations of 1-4 rounds: images (0-2 per human turn) at the front, end or middle of a
    question, answers that open with a word, a digit, "\n" or a literal "</s>"."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 4)):
            q = words(rng.randint(1, 12)) + rng.choice(["?", ".", "", "\n"])
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                cut = rng.randint(0, len(q))
                q = q[:cut] + "<image>" + q[cut:]
            a = rng.choice(["", "", "2 ", "\n", "</s> "]) + words(rng.randint(1, 40)) + rng.choice([".", "", "\n"])
            turns += [q if q.replace("<image>", "").strip() else q + " q", a]
        out.append(conv(*turns))
    return out


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_ids_follow_llavas_rule_on_many_conversations(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    img = tok.convert_tokens_to_ids("<image>")
    vicuna, plain = get_template("vicuna_v1"), get_template("plain")
    samples = [(vicuna, t) for t in random_conversations(60)]
    samples += [(plain, t[:2]) for t in random_conversations(20, seed=1) if "<image>" in t[0]["value"]]
    texts = [t.render(turns).text for t, turns in samples]
    fast = tokenize_texts(texts, tok, img)  # one batched call, no offsets (the lengths path)
    for (template, turns), text, (fast_ids, none) in zip(samples, texts, fast):
        ids, labels = tokenize_conversation(turns, tok, template)
        assert ids.tolist() == llava_ids(tok, text) == fast_ids.tolist() and none is None
        # BOS and image tokens never carry a loss; every answer's "</s>" does (vicuna)
        assert labels[0] == IGNORE_INDEX and labels[ids == img].eq(IGNORE_INDEX).all()
        if template is vicuna:
            eos = tok.convert_tokens_to_ids("</s>")
            n_answers = len(turns) // 2
            assert int(((ids == eos) & (labels != IGNORE_INDEX)).sum()) >= n_answers
            for k in range(n_answers):
                # the generation prompt of round k is the training input cut before answer k's first label:
                # the prompt ends "ASSISTANT:", and the separator space is not a token of its own there but
                # part of the answer's first token ("▁Yes", or a lone "▁" before "2"/"\n"), which is
                # trained on, as in LLaVA, whose prompts also end "ASSISTANT:"; so nothing differs
                prompt = tokenize_prompt(turns[: 2 * k + 1], tok, template)
                ids_k, labels_k = tokenize_conversation(turns[: 2 * k + 2], tok, template)
                cut = len(prompt)
                assert ids_k[:cut].tolist() == prompt
                assert labels_k[cut - 1] == IGNORE_INDEX and labels_k[cut] != IGNORE_INDEX
                assert labels_k[cut:].ne(IGNORE_INDEX).all()  # the last answer runs to the end
                assert torch.equal(labels_k[:cut], labels[:cut])


def test_render_prompt_is_llavas_get_prompt():
    vicuna, plain = get_template("vicuna_v1"), get_template("plain")
    turns = conv("What is this?\n<image>", "A cat.", "And now?")
    # LLaVA: conv_vicuna_v1 with messages [USER q1, ASSISTANT a1, USER q2, ASSISTANT None]
    assert vicuna.render_prompt(turns) == (VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                                           "USER: And now? ASSISTANT:")
    assert vicuna.render_prompt(turns[:1]) == VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert vicuna.render_prompt(conv("Hi")) == VICUNA_SYSTEM + " USER: Hi ASSISTANT:"
    assert plain.render_prompt(conv("Describe.\n<image>")) == "<image>"
    with pytest.raises(SampleError, match="ends with a human turn"):
        vicuna.render_prompt(turns[:2])
    with pytest.raises(SampleError, match="roles"):
        vicuna.render_prompt(conv("q", "a", "q2")[1:] + conv("q"))
    with pytest.raises(SampleError, match="needs an image"):
        plain.render_prompt(conv("Describe."))
    with pytest.raises(SampleError, match="image_tags|gpt turn"):
        vicuna.render_prompt(conv("q", "<image>", "q2"))


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
    tok = request.getfixturevalue(tok_name)
    img, K = tok.convert_tokens_to_ids("<image>"), 30
    vicuna, plain = get_template("vicuna_v1"), get_template("plain")
    fixed = [multi_image_turns(), conv("Hi", "Hello."), conv("<image>\nq", "a " * 40), multi_image_turns()]
    seen = set()
    for template, samples in [(vicuna, fixed + random_conversations(80, seed=2)),
                              # plain cannot render those without an image: an error in both paths
                              (plain, [t[:2] for t in random_conversations(40, seed=3)])]:
        for max_len, overlong in [(10**4, "truncate"), (90, "truncate"), (90, "reject"), (140, "truncate")]:
            fit = Fit(img, K, max_len, overlong)
            lengths, truncated, errors = batch_lengths(samples, tok, template, fit)
            for i, turns in enumerate(samples):
                try:
                    enc = encode_sample(turns, tok, template, fit)
                    assert lengths[i] == enc.length and truncated[i] == enc.truncated and i not in errors
                    seen.add("truncated" if enc.truncated else "whole")
                except SampleError as e:
                    assert lengths[i] == 0 and errors[i].reason == e.reason
                    seen.add(e.reason)
    assert {"whole", "truncated", "overlong", "template"} <= seen, seen
