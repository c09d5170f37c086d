"""The first LLaVA's `v0` template (conv_vicuna_v0 + LLaVA's default `preprocess` with _add_speaker_and_signal):
the exact string, token ids and label masks against hand-worked sequences on the LLaMA-like SentencePiece and
the byte-level BPE fixtures, generation prompts, malformed conversations, and where our masks differ from
what LLaVA's own length arithmetic (_tokenize_fn per sentence + _mask_targets) trains."""

import pytest
import torch

from fastllava.batch import IGNORE_INDEX
from fastllava.data.files import SampleError
from fastllava.data.templates import V0_SYSTEM, Rendered, get_template
from fastllava.data.tokenize import image_token_id, tokenize_conversation, tokenize_prompt, tokenize_rendered


def conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def two_rounds():
    return conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "Yes.")


def test_v0_string_is_llavas_training_string():
    r = get_template("v0").render(two_rounds())
    # LLaVA: header = system + "\n\n"; each sentence "### " + role + ": " + value + "\n"; then a closing "### ";
    # preprocess_multimodal has moved <image> to the front of its turn, followed by "\n".
    assert r.text == (V0_SYSTEM + "\n\n### Human: <image>\nWhat is in the image?\n### Assistant: A cat.\n"
                      "### Human: Is there a dog?\n### Assistant: Yes.\n### ")
    assert [r.text[a:b] for a, b in r.answer_spans] == [" A cat.\n###", " Yes.\n###"]
    assert r.num_images == 1
    assert V0_SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the human's questions.")
    assert get_template("v0").stop_str == "###"


# V0_SYSTEM + "\n\n" as chunk 0 starts: "human" is not in the fixtures' corpus, so it is spelled out
LLAMA_HEAD = ["<s>", "▁A", "▁c", "hat", "▁b", "etw", "een", "▁a", "▁c", "ur", "io", "us", "▁", "h", "u", "ma", "n",
              "▁and", "▁an", "▁a", "rt", "ifi", "ci", "al", "▁i", "nt", "ell", "i", "gen", "ce", "▁assistant", ".",
              "▁The", "▁assistant", "▁", "giv", "es", "▁", "he", "lp", "ful", ",", "▁detai", "led", ",", "▁and", "▁p",
              "ol", "ite", "▁an", "s", "wer", "s", "▁to", "▁the", "▁", "h", "u", "ma", "n", "'", "s", "▁questio",
              "ns", ".\n", "\n"]
BPE_HEAD = ["<s>", "A", "Ġchat", "Ġbetween", "Ġa", "Ġcurious", "Ġ", "h", "u", "ma", "n", "Ġand", "Ġan", "Ġartificial",
            "Ġintelligence", "Ġassistant", ".", "ĠThe", "Ġassistant", "Ġgives", "Ġhelpful", ",", "Ġdetailed", ",",
            "Ġand", "Ġpolite", "Ġanswers", "Ġto", "Ġthe", "Ġ", "h", "u", "ma", "n", "'s", "Ġquestions", ".", "Ċ", "Ċ"]
# "#" is not in the SentencePiece fixture's vocabulary: byte fallback. "###" after "\n" has no dummy prefix.
SP_STOP = ["<0x23>"] * 3
BPE_STOP = ["#"] * 3


def test_v0_ids_by_hand_sentencepiece(llama_tok):
    tok = llama_tok
    ids, labels = tokenize_conversation(two_rounds(), tok, "v0")
    # chunk 0: V0_SYSTEM + "\n\n### Human: " (trailing space: a lone "▁"); chunk 1, after the image, loses its
    # "<s>" and opens with the dummy-prefix "▁" before "\n"
    head = LLAMA_HEAD + SP_STOP + ["▁H", "u", "ma", "n", ":", "▁", "<image>", "▁", "\n", "W", "hat", "▁is", "▁in",
                                   "▁the", "▁image", "?", "\n"] + SP_STOP + ["▁A", "ss", "istant", ":"]
    answer1 = ["▁A", "▁c", "at", ".\n"] + SP_STOP  # the separator space rides on "▁A"; ".\n" is one piece
    turn2 = ["▁H", "u", "ma", "n", ":", "▁", "Is", "▁there", "▁a", "▁dog", "?", "\n"] + SP_STOP + ["▁A", "ss", "istant",
                                                                                                   ":"]
    answer2 = ["▁Y", "es", ".\n"] + SP_STOP
    tail = ["▁"]  # the space of LLaVA's closing "### ": no loss
    assert pieces(tok, ids) == head + answer1 + turn2 + answer2 + tail
    trained = [False] * len(head) + [True] * len(answer1) + [False] * len(turn2) + [True] * len(answer2) + [False]
    assert (labels != IGNORE_INDEX).tolist() == trained
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    assert ids[:3].tolist() == [1, 271, 266] and ids[-5:].tolist() == [353, 38, 38, 38, 421]
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 1


def test_v0_ids_by_hand_bytelevel(bpe_tok):
    tok = bpe_tok
    ids, labels = tokenize_conversation(two_rounds(), tok, "v0")
    head = BPE_HEAD + BPE_STOP + ["Ġ", "H", "u", "ma", "n", ":", "Ġ", "<image>", "Ċ", "What", "Ġis", "Ġin", "Ġthe",
                                  "Ġimage", "?", "Ċ"] + BPE_STOP + ["ĠA", "ss", "istant", ":"]
    answer1 = ["ĠA", "Ġcat", ".", "Ċ"] + BPE_STOP
    turn2 = ["Ġ", "H", "u", "ma", "n", ":", "ĠIs", "Ġthere", "Ġa", "Ġdog", "?", "Ċ"] + BPE_STOP + ["ĠA", "ss", "istant",
                                                                                                   ":"]
    answer2 = ["ĠYes", ".", "Ċ"] + BPE_STOP
    assert pieces(tok, ids) == head + answer1 + turn2 + answer2 + ["Ġ"]
    trained = [False] * len(head) + [True] * len(answer1) + [False] * len(turn2) + [True] * len(answer2) + [False]
    assert (labels != IGNORE_INDEX).tolist() == trained
    assert ids[:2].tolist() == [0, 35] and ids[-5:].tolist() == [201, 5, 5, 5, 223]


@pytest.mark.parametrize("tok_name, head, stop, lone_space, digit", [
    ("llama_tok", LLAMA_HEAD, SP_STOP, "▁", "<0x32>"), ("bpe_tok", BPE_HEAD, BPE_STOP, "Ġ", "2")])
def test_v0_text_only_by_hand(request, tok_name, head, stop, lone_space, digit):
    tok = request.getfixturevalue(tok_name)
    ids, labels = tokenize_conversation(conv("Hi", "2 dogs."), tok, "v0")
    human = ["▁H", "u", "ma", "n", ":", "▁H", "i", "\n"] if lone_space == "▁" else ["Ġ", "H", "u", "ma", "n", ":", "Ġ",
                                                                                     "H", "i", "Ċ"]
    assistant = (["▁A"] if lone_space == "▁" else ["ĠA"]) + ["ss", "istant", ":"]
    # an answer opening with a digit has no merged-space token: the lone separator space opens the loss, as in
    # vicuna_v1 (and as LLaVA trains it: its masks leave the whole assistant sentence in the loss)
    dogs = ["▁dog", "s", ".\n"] if lone_space == "▁" else ["Ġdog", "s", ".", "Ċ"]
    answer = [lone_space, digit] + dogs + stop
    assert pieces(tok, ids) == head + stop + human + stop + assistant + answer + [lone_space]
    n_prompt = len(head) + len(stop) + len(human) + len(stop) + len(assistant)
    assert (labels != IGNORE_INDEX).tolist() == [False] * n_prompt + [True] * len(answer) + [False]
    assert tok.convert_tokens_to_ids("<image>") not in ids.tolist()


@pytest.mark.parametrize("tok_name", ["llama_tok", "bpe_tok"])
def test_v0_prompt_is_a_prefix_of_the_training_ids(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    template = get_template("v0")
    turns = conv("<image>\nWhat is in the first image?", "A cat.", "<image>\nAnd this one?", "\nTwo dogs.",
                 "How many?", "3")
    for k in range(3):
        text = template.render_prompt(turns[: 2 * k + 1])
        full = template.render(turns[: 2 * k + 2]).text
        assert text.endswith("\n### Assistant:") and full.startswith(text)
        prompt = tokenize_prompt(turns[: 2 * k + 1], tok, "v0")
        ids, labels = tokenize_conversation(turns[: 2 * k + 2], tok, "v0")
        cut = len(prompt)
        # the prompt's ids are the training ids up to the answer's first label token
        assert ids[:cut].tolist() == prompt
        assert labels[cut - 1] == IGNORE_INDEX and labels[cut] != IGNORE_INDEX
    assert template.render_prompt(conv("Describe.\n<image>")) == V0_SYSTEM + "\n\n### Human: <image>\nDescribe.\n### Assistant:"


def test_v0_rejects_malformed_conversations(llama_tok):
    template = get_template("v0")
    with pytest.raises(SampleError, match="roles"):
        tokenize_conversation(conv("q", "a")[1:] + conv("q"), llama_tok, "v0")  # starts with gpt
    with pytest.raises(SampleError, match="roles"):
        tokenize_conversation(conv("q", "a", "q2"), llama_tok, "v0")  # the last question has no answer
    with pytest.raises(SampleError, match="image_tags"):
        tokenize_conversation(conv("q", "a <image>"), llama_tok, "v0")
    with pytest.raises(SampleError, match="ends with a human turn"):
        template.render_prompt(conv("q", "a"))


def llava_v0_trained_spans(text, turns):
    """What LLaVA's _mask_targets leaves in the loss, as character spans, where its length arithmetic lines up
    (the LLaMA vocabulary: "<s>" + "▁###" of a sentence tokenized alone are as many tokens as "##" "#" after
    "\\n" in the whole conversation): the first two tokens ("###") of every human sentence, every assistant
    sentence whole ("### Assistant: " + answer + "\\n"), and the closing "### " that nothing masks."""
    spans, pos = [], len(V0_SYSTEM) + 2
    for turn in turns:
        end = text.index("\n###", pos) + 1  # each sentence ends with its "\n"
        spans.append((pos, pos + 3) if turn["from"] == "human" else (pos, end))
        pos = end
    return spans + [(pos, len(text))]


def llava_ids(tok, text):
    """LLaVA's tokenizer_image_token restated: one tokenizer call per chunk between "<image>" tags, the BOS of
    every later chunk dropped, one image id between chunks."""
    chunks = [tok(c)["input_ids"] for c in text.split("<image>")]
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [tok.convert_tokens_to_ids("<image>")] + c[1:]
    return ids


def llava_v0_labels(tok, header, sentences, speakers, full_ids):
    """LLaVA's preprocess (has_image): tokenized_lens of the header and of each sentence ALONE, then
    _mask_targets: everything up to the header's length ignored, and in each human sentence all but its first
    two tokens."""
    lens = [len(llava_ids(tok, s)) for s in [header] + sentences]
    target = list(full_ids)
    cur = lens[0]
    target[:cur] = [IGNORE_INDEX] * cur
    for n, speaker in zip(lens[1:], speakers):
        if speaker == "human":
            target[cur + 2 : cur + n] = [IGNORE_INDEX] * len(target[cur + 2 : cur + n])
        cur += n
    return target, sum(lens)


@pytest.mark.parametrize("tok_name", ["llama_tok", "bpe_tok"])
def test_differences_from_llavas_length_arithmetic(request, tok_name):
    """Ours trains each answer and the "###" after it. LLaVA's _mask_targets, where its arithmetic lines up, also
    trains the "###" opening the first human turn, every "### Assistant:" header and the closing space; where it
    does not (both fixtures), its per-sentence lengths overcount and its masks land on other tokens."""
    tok = request.getfixturevalue(tok_name)
    turns = two_rounds()
    rendered = get_template("v0").render(turns)
    ids, ours = tokenize_conversation(turns, tok, "v0")
    intended = Rendered(rendered.text, tuple(llava_v0_trained_spans(rendered.text, turns)), rendered.num_images)
    _, theirs = tokenize_rendered(intended, tok, image_token_id(tok))
    ours_on, theirs_on = (ours != IGNORE_INDEX).numpy(), theirs != IGNORE_INDEX
    assert not (ours_on & ~theirs_on).any()  # everything we train, LLaVA's rule trains too
    runs, cur = [], []
    for t, extra in zip(ids.tolist() + [None], (theirs_on & ~ours_on).tolist() + [False]):
        if extra:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur).strip())
            cur = []
    assert runs == ["###", "### Assistant:", "### Assistant:", ""]  # the last: the closing space alone

    # LLaVA's own arithmetic on these vocabularies
    header = V0_SYSTEM + "\n\n"
    sentences = ["### Human: <image>\nWhat is in the image?\n", "### Assistant: A cat.\n",
                 "### Human: Is there a dog?\n", "### Assistant: Yes.\n"]
    assert header + "".join(sentences) + "### " == rendered.text
    assert ids.tolist() == llava_ids(tok, rendered.text)  # the same input ids
    labels, counted = llava_v0_labels(tok, header, sentences, [t["from"] for t in turns], ids.tolist())
    n_closing = 4  # the closing "### ": three "#" tokens (bytes in SentencePiece) and the space
    # each sentence alone costs "<s>" more, and with SentencePiece also the dummy-prefix "▁" before "###"
    assert counted - (len(ids) - n_closing) == len(sentences) * {"llama_tok": 2, "bpe_tok": 1}[tok_name]
    assert labels != theirs.tolist()  # so its masks are not even its intended ones here


@pytest.mark.parametrize("tok_name, hashes", [("llama_tok", ["<0x23>"] * 3), ("bpe_tok", ["#"] * 3)])
def test_v0_stops_on_the_training_texts_marker(request, tok_name, hashes):
    """Generation stops on "###" as the training text tokenizes it after an answer (the tokens of SP_STOP /
    BPE_STOP above), not as "###" tokenizes alone, and on EOS."""
    tok = request.getfixturevalue(tok_name)
    alone = tok("###", add_special_tokens=False)["input_ids"]
    stops = get_template("v0").stop_ids(tok)
    assert stops == [[tok.eos_token_id], tok.convert_tokens_to_ids(hashes)]
    if tok_name == "llama_tok":  # SentencePiece puts a dummy-prefix "▁" before "###" alone
        assert alone not in stops
