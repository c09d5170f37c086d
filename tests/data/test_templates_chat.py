"""LLaVA-NeXT's chat templates `llama3`, `qwen` (ChatML) and `mistral`: the exact strings of its conversation.py and
train.py, token ids and label masks against hand-worked sequences on tokenizers shaped like the real ones (Llama-3's
and Qwen2's byte-level BPE with their special tokens; the LLaMA-like SentencePiece for Mistral), generation prompts
as prefixes of the training ids, stop ids, refusal of a tokenizer without the template's special tokens, and what
LLaVA-NeXT's own masks (preprocess_qwen, preprocess_llama3, restated here) train besides."""

import pytest
import torch

from fastllava.batch import IGNORE_INDEX
from fastllava.config import DataConfig
from fastllava.data.files import SampleError
from fastllava.data.templates import LLAMA3_SYSTEM, QWEN_SYSTEM, get_template
from fastllava.data.tokenize import load_tokenizer, tokenize_conversation, tokenize_prompt
from fastllava.testing import write_llama3_tokenizer, write_qwen2_tokenizer

CHAT_TEMPLATES = ["llama3", "qwen", "mistral"]


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    return load_tokenizer(write_llama3_tokenizer(tmp_path_factory.mktemp("llama3_tok")))


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return load_tokenizer(write_qwen2_tokenizer(tmp_path_factory.mktemp("qwen_tok")))


def tokenizer_for(request, template):
    return request.getfixturevalue({"llama3": "llama3_tok", "qwen": "qwen_tok", "mistral": "llama_tok"}[template])


def conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


def two_rounds():
    return conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "Yes.")


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


# ---------------------------------------------------------------------------------------------- strings

H = "<|start_header_id|>{}<|end_header_id|>\n\n".format


def test_strings_are_llava_nexts():
    assert LLAMA3_SYSTEM == ("You are a helpful language and vision assistant. You are able to understand the visual "
                             "content that the user provides, and assist the user with a variety of tasks using "
                             "natural language.")
    assert QWEN_SYSTEM == "You are a helpful assistant."
    expected = {
        # Llama-3 Instruct's chat template: no separator between messages, BOS left to the tokenizer
        "llama3": (H("system") + LLAMA3_SYSTEM + "<|eot_id|>" + H("user") + "<image>\nWhat is in the image?<|eot_id|>"
                   + H("assistant") + "A cat.<|eot_id|>" + H("user") + "Is there a dog?<|eot_id|>" + H("assistant")
                   + "Yes.<|eot_id|>", ["A cat.<|eot_id|>", "Yes.<|eot_id|>"]),
        "qwen": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the "
                 "image?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nIs there a dog?<|im_end|>\n"
                 "<|im_start|>assistant\nYes.<|im_end|>\n", ["A cat.<|im_end|>", "Yes.<|im_end|>"]),
        # conv_mistral_instruct: sep "" between rounds, " " + answer + " " + "</s>"
        "mistral": ("[INST] <image>\nWhat is in the image? [/INST] A cat. </s>[INST] Is there a dog? [/INST] Yes. </s>",
                    [" A cat. </s>", " Yes. </s>"]),
    }
    for name, (text, spans) in expected.items():
        r = get_template(name).render(two_rounds())
        assert r.text == text and [r.text[a:b] for a, b in r.answer_spans] == spans and r.num_images == 1, name
    assert {n: get_template(n).stop_str for n in CHAT_TEMPLATES} == {
        "llama3": "<|eot_id|>", "qwen": "<|im_end|>", "mistral": "</s>"}


def test_messages_as_each_format_writes_them():
    # Llama-3's template trims every message; ChatML and [INST] keep them as they are
    turns = conv("  Describe it. \n", " Two dogs.\n")
    assert get_template("llama3").render(turns).text.endswith(H("user") + "Describe it.<|eot_id|>" + H("assistant")
                                                              + "Two dogs.<|eot_id|>")
    assert get_template("qwen").render(turns).text.endswith(
        "user\n  Describe it. \n<|im_end|>\n<|im_start|>assistant\n Two dogs.\n<|im_end|>\n")
    assert get_template("mistral").render(turns).text == "[INST]   Describe it. \n [/INST]  Two dogs.\n </s>"


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_image_tags_go_where_llava_next_puts_them(template):
    """preprocess_multimodal of LLaVA-NeXT moves a turn's one tag to its front unless it is there already, and
    leaves several tags in place (LLaVA-1.5's moves every tag, and puts "\\n" after one already in front)."""
    def question(value):
        text = get_template(template).render(conv(value, "ok")).text
        start = text.index("<image>")
        return text[start: text.index({"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "mistral": " [/INST]"}[template],
                                      start)]
    assert question("Is it red?\n<image>") == "<image>\nIs it red?"
    assert question("Is it <image> red?") == "<image>\nIs it  red?"
    assert question("<image>Is it red?") == "<image>Is it red?"
    assert question("<image> left, <image> right: same?") == "<image> left, <image> right: same?"
    vicuna = get_template("vicuna_v1").render(conv("<image>Is it red?", "ok")).text
    assert "<image>\nIs it red?" in vicuna


# ---------------------------------------------------------------------------------- token ids by hand
#
# Worked out piece by piece from each fixture's vocabulary: the specials come after the learned vocabulary (as
# Llama-3's 128000+ and Qwen's 151643+ do); "Ċ" is "\n" and "ĊĊ" "\n\n", split from the words around them by the
# pre-tokenizer regex, so the text after "<|end_header_id|>\n\n" or "assistant\n" starts a fresh token.

SYSTEM_WORDS = ["You", "Ġare", "Ġa", "Ġhelpful"]
LLAMA3_SYSTEM_PIECES = SYSTEM_WORDS + ["Ġlanguage", "Ġand", "Ġvision", "Ġassistant", ".", "ĠYou", "Ġare", "Ġable",
                                       "Ġto", "Ġunderstand", "Ġthe", "Ġvisual", "Ġcontent", "Ġthat", "Ġthe", "Ġuser",
                                       "Ġprovides", ",", "Ġand", "Ġassist", "Ġthe", "Ġuser", "Ġwith", "Ġa", "Ġvariety",
                                       "Ġof", "Ġtasks", "Ġusing", "Ġnatural", "Ġlanguage", "."]
QUESTION1 = ["What", "Ġis", "Ġin", "Ġthe", "Ġimage", "?"]
QUESTION2 = ["Is", "Ġthere", "Ġa", "Ġdog", "?"]


def check_by_hand(tok, template, parts):
    """parts: (pieces, trained) in order; the ids and the label mask of two_rounds() must be exactly these."""
    ids, labels = tokenize_conversation(two_rounds(), tok, template)
    assert pieces(tok, ids) == [p for ps, _ in parts for p in ps]
    assert (labels != IGNORE_INDEX).tolist() == [t for ps, t in parts for _ in ps]
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    return ids


def test_llama3_ids_by_hand(llama3_tok):
    tok = llama3_tok
    user = ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ"]
    assistant = ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]
    ids = check_by_hand(tok, "llama3", [
        (["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "ĊĊ"] + LLAMA3_SYSTEM_PIECES
         + ["<|eot_id|>"] + user + ["<image>", "Ċ"] + QUESTION1 + ["<|eot_id|>"] + assistant, False),
        (["A", "Ġcat", ".", "<|eot_id|>"], True),
        (user + QUESTION2 + ["<|eot_id|>"] + assistant, False),
        (["Yes", ".", "<|eot_id|>"], True),
    ])
    # the specials follow the 586 learned ids: <|begin_of_text|> <|end_of_text|> <|start_header_id|>
    # <|end_header_id|> <|eot_id|>, then what prepare_tokenizer adds: <image>, and <pad> (no unk to reuse)
    assert ids[:5].tolist() == [586, 588, 579, 589, 348]
    assert tok.convert_tokens_to_ids(["<|eot_id|>", "<image>", "<pad>"]) == [590, 591, 592]
    assert ids[-3:].tolist() == [390, 13, 590]


def test_qwen_ids_by_hand(qwen_tok):
    tok = qwen_tok
    user = ["<|im_start|>", "user", "Ċ"]
    assistant = ["<|im_start|>", "assistant", "Ċ"]
    ids = check_by_hand(tok, "qwen", [
        (["<|im_start|>", "system", "Ċ"] + SYSTEM_WORDS + ["Ġassistant", ".", "<|im_end|>", "Ċ"] + user
         + ["<image>", "Ċ"] + QUESTION1 + ["<|im_end|>", "Ċ"] + assistant, False),
        (["A", "Ġcat", ".", "<|im_end|>"], True),
        (["Ċ"] + user + QUESTION2 + ["<|im_end|>", "Ċ"] + assistant, False),
        (["Yes", ".", "<|im_end|>"], True),
        (["Ċ"], False),  # the "\n" after the last "<|im_end|>": in the text, as LLaVA-NeXT's, without loss
    ])
    assert ids[:3].tolist() == [587, 579, 198]  # no BOS: <|im_start|> opens the text
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<image>"]) == [588, 589] and tok.bos_token_id is None
    assert ids[-4:].tolist() == [390, 13, 588, 198]


def test_mistral_ids_by_hand(llama_tok):
    tok = llama_tok
    # "[" "]" "/" are not in the SentencePiece fixture's vocabulary: byte fallback. After "</s>" the text gets no
    # dummy prefix (legacy=False), so the second "[INST]" has no "▁" before it.
    inst = ["<0x5B>", "I", "N", "S", "T", "<0x5D>"]
    close = ["▁", "<0x5B>", "<0x2F>", "I", "N", "S", "T", "<0x5D>"]
    ids = check_by_hand(tok, "mistral", [
        (["<s>", "▁"] + inst + ["▁", "<image>", "▁", "\n", "W", "hat", "▁is", "▁in", "▁the", "▁image", "?"] + close,
         False),
        (["▁A", "▁c", "at", ".", "▁", "</s>"], True),  # the separator space rides on "▁A"; " </s>" is "▁" "</s>"
        (inst + ["▁", "Is", "▁there", "▁a", "▁dog", "?"] + close, False),
        (["▁Y", "es", ".", "▁", "</s>"], True),
    ])
    assert ids[:3].tolist() == [1, 421, 94] and ids[-2:].tolist() == [421, 2]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_awkward_answers_train_whole(request, template):
    """Answers opening with a space, a newline or a digit, and unicode: the label tokens decode to the answer as the
    template writes it, with its end token."""
    tok = tokenizer_for(request, template)
    end = get_template(template).stop_str
    for answer in [" \nYes, there is.", "2 dogs.", "Café 日本語 🙂"]:
        ids, labels = tokenize_conversation(conv("<image>\nWhat?", answer), tok, template)
        trained = tok.decode(labels[labels != IGNORE_INDEX])
        written = {"llama3": answer.strip() + end, "qwen": answer + end, "mistral": " " + answer + " " + end}[template]
        # SentencePiece's decoder drops one leading space
        assert trained in (written, written.removeprefix(" ")), (trained, written)


# ---------------------------------------------------------------------------------- prompts and stops


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_prompt_is_a_prefix_of_the_training_ids(request, template):
    tok = tokenizer_for(request, template)
    t = get_template(template)
    turns = conv("<image>\nWhat is in the first image?", "A cat.", "And this one?\n<image>", "Two dogs.",
                 "How many?", "3")
    for k in range(3):
        text = t.render_prompt(turns[: 2 * k + 1])
        assert t.render(turns[: 2 * k + 2]).text.startswith(text)
        prompt = tokenize_prompt(turns[: 2 * k + 1], tok, template)
        ids, labels = tokenize_conversation(turns[: 2 * k + 2], tok, template)
        cut = len(prompt)
        assert ids[:cut].tolist() == prompt  # the prompt's ids are the training ids up to the first label token
        assert labels[cut - 1] == IGNORE_INDEX and labels[cut] != IGNORE_INDEX
    # each format's generation prompt (apply_chat_template with add_generation_prompt / get_prompt())
    last = {"llama3": H("user") + "<image>\nDescribe.<|eot_id|>" + H("assistant"),
            "qwen": "<|im_start|>user\n<image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n",
            "mistral": "[INST] <image>\nDescribe. [/INST]"}[template]
    assert t.render_prompt(conv("Describe.\n<image>")).endswith(last)


def test_stop_ids_are_the_end_tokens(llama3_tok, qwen_tok, llama_tok, tmp_path):
    eot, im_end = llama3_tok.convert_tokens_to_ids("<|eot_id|>"), qwen_tok.convert_tokens_to_ids("<|im_end|>")
    # the Instruct tokenizers' EOS is the end token itself
    assert get_template("llama3").stop_ids(llama3_tok) == [[eot]] == [[590]]
    assert get_template("qwen").stop_ids(qwen_tok) == [[im_end]] == [[588]]
    assert get_template("mistral").stop_ids(llama_tok) == [[2]]
    # a base model's tokenizer ends documents with another EOS: both stop
    base = load_tokenizer(write_llama3_tokenizer(tmp_path / "l3"))
    base.eos_token = "<|end_of_text|>"
    assert get_template("llama3").stop_ids(base) == [[base.convert_tokens_to_ids("<|end_of_text|>")], [eot]]
    base = load_tokenizer(write_qwen2_tokenizer(tmp_path / "q"))
    base.eos_token = "<|endoftext|>"
    assert get_template("qwen").stop_ids(base) == [[586], [im_end]]


@pytest.mark.parametrize("template, tok_name, missing", [
    ("llama3", "qwen_tok", "<|eot_id|>"), ("llama3", "llama_tok", "<|eot_id|>"), ("qwen", "llama3_tok", "<|im_end|>"),
    ("qwen", "bpe_tok", "<|im_end|>"), ("mistral", "qwen_tok", "</s>"), ("mistral", "llama3_tok", "</s>")])
def test_tokenizer_without_the_special_token_is_refused(request, template, tok_name, missing):
    tok = request.getfixturevalue(tok_name)
    with pytest.raises(ValueError, match=f"template '{template}'.*'{missing}'.*special token"):
        tokenize_conversation(two_rounds(), tok, template)
    with pytest.raises(ValueError, match=f"'{missing}'"):
        tokenize_prompt(two_rounds()[:1], tok, template)


def test_headers_are_required_too(llama3_tok, qwen_tok):
    assert get_template("llama3").required_tokens == ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
    assert get_template("qwen").required_tokens == ("<|im_end|>", "<|im_start|>")
    for template, tok in (("llama3", llama3_tok), ("qwen", qwen_tok)):
        for token in get_template(template).required_tokens:
            assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


def test_configs_and_command_lines_take_the_names():
    from fastllava.chat import parse_args

    for name in CHAT_TEMPLATES:
        assert DataConfig(template=name).template == name
        assert parse_args(["--model", "m", "--template", name]).template == name
    with pytest.raises(ValueError, match="data.template: unknown conversation template 'llama_3'.*'llama3'"):
        DataConfig(template="llama_3")
    with pytest.raises(SampleError, match="ends with a human turn"):
        get_template("qwen").render_prompt(conv("q", "a"))


# -------------------------------------------------------------------- LLaVA-NeXT's own masks, restated


def llava_next_qwen(tok, turns):
    """preprocess_qwen restated: each message tokenized alone through its chat template
    "<|im_start|>" + role + "\\n" + content + "<|im_end|>" + "\\n"; system and user messages masked, assistant
    messages trained whole; then every <|im_start|>, <|im_end|> and "\\n" token (its hard-coded 198, Qwen's "Ċ")
    trained wherever it stands."""
    ids, target = [], []
    messages = [("system", QWEN_SYSTEM)] + [("user" if t["from"] == "human" else "assistant", t["value"])
                                           for t in turns]
    for role, content in messages:
        text = "<|im_start|>" + role + "\n" + content + "<|im_end|>" + "\n"
        encoded = tok(text, add_special_tokens=False)["input_ids"]
        ids += encoded
        target += encoded if role == "assistant" else [IGNORE_INDEX] * len(encoded)
    unmask = {tok.convert_tokens_to_ids("Ċ"), *tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])}
    return ids, [i if i in unmask else t for i, t in zip(ids, target)]


def llava_next_llama3(tok, turns):
    """preprocess_llama3 restated: the system message through the chat template with its BOS, every other message
    alone without it (its [1:]); system and user masked, assistant trained whole; then <|begin_of_text|>,
    <|start_header_id|>, <|end_header_id|>, <|eot_id|> and convert_tokens_to_ids("\\n\\n") trained wherever they
    stand. The last is None (the vocabulary spells "\\n\\n" as "ĊĊ" and has no unk), so no "\\n\\n" is unmasked."""
    ids, target = [], []
    messages = [("system", LLAMA3_SYSTEM)] + [("user" if t["from"] == "human" else "assistant", t["value"])
                                             for t in turns]
    for k, (role, content) in enumerate(messages):
        text = ("<|begin_of_text|>" if k == 0 else "") + H(role) + content.strip() + "<|eot_id|>"
        encoded = tok(text, add_special_tokens=False)["input_ids"]
        ids += encoded
        target += encoded if role == "assistant" else [IGNORE_INDEX] * len(encoded)
    unmask = set(tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                            "<|eot_id|>", "\n\n"]))
    assert None in unmask
    return ids, [i if i in unmask else t for i, t in zip(ids, target)]


def extra_runs(tok, ids, ours, theirs):
    """The tokens LLaVA-NeXT trains and we do not, decoded run by run."""
    runs, cur = [], []
    for i, o, t in zip(ids + [None], ours + [IGNORE_INDEX], theirs + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and o == IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


@pytest.mark.parametrize("template", ["qwen", "llama3"])
def test_differences_from_llava_nexts_masks(request, template):
    """Same input ids; everything we train LLaVA-NeXT trains; it also trains the tokens listed here."""
    tok = tokenizer_for(request, template)
    turns = conv("<image>\nWhat is in the image?", "A cat.", "Is there a dog?", "Yes.")  # the tag where both put it
    ids, ours = tokenize_conversation(turns, tok, template)
    img = tok.convert_tokens_to_ids("<image>")
    theirs_ids, theirs = (llava_next_qwen if template == "qwen" else llava_next_llama3)(tok, turns)
    assert ids.tolist() == theirs_ids  # the same text, tokenized the same (the image token in place of the tag)
    ids, ours = ids.tolist(), ours.tolist()
    theirs = [IGNORE_INDEX if i == img else t for i, t in zip(ids, theirs)]
    assert all(t != IGNORE_INDEX for o, t in zip(ours, theirs) if o != IGNORE_INDEX)
    if template == "qwen":  # every ChatML marker and lone "\n", the assistant header, the "\n" after each answer
        assert extra_runs(tok, ids, ours, theirs) == [
            "<|im_start|>", "\n", "<|im_end|>\n<|im_start|>", "\n", "\n", "<|im_end|>\n<|im_start|>assistant\n",
            "\n<|im_start|>", "\n", "<|im_end|>\n<|im_start|>assistant\n", "\n"]
    else:  # BOS, every header's special tokens, every <|eot_id|>, the assistant headers whole
        assert extra_runs(tok, ids, ours, theirs) == [
            "<|begin_of_text|><|start_header_id|>", "<|end_header_id|>", "<|eot_id|><|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]
