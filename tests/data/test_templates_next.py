"""The templates of LLaVA-NeXT's released models and how chat and eval pick them for a directory that records none.

`chatml_direct` (LLaVA-1.6-34B) and `mistral_instruct` (LLaVA-1.6-Mistral-7B, the `mistral` template under LLaVA's
name): their text against LLaVA's conv.get_prompt() restated and against the prompts llava-hf's model cards print, ids
and label masks hand-worked on a tokenizer shaped like Yi's (SentencePiece with ChatML's special tokens), stop ids,
refusal of a tokenizer without them, and why LLaVA's own mask for them is not followed. Then `model_template` on
small directories holding each release's chat template text (the structure of the public files, quoted below).
"""

import json

import pytest
import torch

from fastllava import chat
from fastllava.batch import IGNORE_INDEX
from fastllava.config import DataConfig
from fastllava.data.templates import CHATML_DIRECT_SYSTEM, TEMPLATES, get_template
from fastllava.data.tokenize import load_tokenizer, tokenize_conversation, tokenize_prompt
from fastllava.generate.inputs import model_template
from fastllava.testing import write_llama_tokenizer


@pytest.fixture(scope="module")
def yi_tok(tmp_path_factory):
    """Nous-Hermes-2-Yi-34B's tokenizer is a LLaMA SentencePiece whose vocabulary holds ChatML's <|im_start|> and
    <|im_end|> as special tokens, EOS <|im_end|>: the LLaMA-like fixture with those two added, saved and reloaded
    as a directory would be."""
    path = tmp_path_factory.mktemp("yi_tok")
    tok = load_tokenizer(write_llama_tokenizer(path))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(str(path))
    return load_tokenizer(path)


def conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


# ------------------------------------------------------------------------ LLaVA's get_prompt(), restated


def llava_get_prompt(name, turns):
    """LLaVA's Conversation.get_prompt() for conv_templates[name] with the turns appended and, for turns that end
    with a human turn, an empty assistant message: the MPT separator style of conv_chatml_direct (system + sep, then
    role + message + sep, the role alone for an empty message) and the LLAMA_2 style of conv_mistral_instruct (empty
    system, "[INST] " + q + " [/INST]" after sep "", " " + a + " " + sep2 "</s>", lstripped of sep)."""
    messages = [t["value"] for t in turns] + ([None] if len(turns) % 2 else [])
    if name == "chatml_direct":
        system, roles, sep = "<|im_start|>system\nAnswer the questions.", ("<|im_start|>user\n",
                                                                           "<|im_start|>assistant\n"), "<|im_end|>"
        out = system + sep
        for k, m in enumerate(messages):
            out += roles[k % 2] + m + sep if m else roles[k % 2]
        return out
    assert name == "mistral_instruct"
    out = ""
    for k, m in enumerate(messages):
        if m:
            out += "" + "[INST] " + m + " [/INST]" if k % 2 == 0 else " " + m + " " + "</s>"  # sep, sep2
    return out


CONVERSATIONS = [
    conv("<image>\nWhat is shown in this image?"),
    conv("<image>\nWhat is in the image?", "A cat."),
    conv("<image>\nWhat is in the image?", "A cat.", "Is there a dog?", "Yes, a small one.", "What colour?"),
]


@pytest.mark.parametrize("name", ["chatml_direct", "mistral_instruct"])
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["prompt", "one round", "three rounds"])
def test_text_is_llavas_get_prompt(name, turns):
    t = get_template(name)
    text = t.render_prompt(turns) if len(turns) % 2 else t.render(turns).text
    assert text == llava_get_prompt(name, turns)


def test_prompts_are_the_model_cards():
    # llava-hf/llava-v1.6-34b-hf and llava-v1.6-mistral-7b-hf document these prompts
    q = conv("What is shown in this image?\n<image>")
    assert get_template("chatml_direct").render_prompt(q) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this image?"
        "<|im_end|><|im_start|>assistant\n")
    assert get_template("mistral_instruct").render_prompt(q) == "[INST] <image>\nWhat is shown in this image? [/INST]"
    assert CHATML_DIRECT_SYSTEM == "Answer the questions."


def test_chatml_direct_spans_and_stop():
    r = get_template("chatml_direct").render(conv("What is in the image?\n<image>", "A cat.", "Is there a dog?",
                                                  "Yes."))
    # no "\n" after <|im_end|> (qwen's ChatML has one); each answer trains with its <|im_end|>
    assert r.text == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the "
                      "image?<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nIs there a dog?"
                      "<|im_end|><|im_start|>assistant\nYes.<|im_end|>")
    assert [r.text[a:b] for a, b in r.answer_spans] == ["A cat.<|im_end|>", "Yes.<|im_end|>"] and r.num_images == 1
    assert get_template("chatml_direct").stop_str == "<|im_end|>"
    assert get_template("chatml_direct").required_tokens == ("<|im_end|>", "<|im_start|>")


def test_mistral_instruct_is_mistral():
    assert TEMPLATES["mistral_instruct"] is TEMPLATES["mistral"]
    for name in ("chatml_direct", "mistral_instruct"):
        assert DataConfig(template=name).template == name
        assert chat.parse_args(["--model", "m", "--template", name]).template == name


# ---------------------------------------------------------------------------- token ids by hand (Yi-shaped)
#
# The fixture's 480 learned pieces have no "system", "user", "assistant" or "[INST]": they come in pieces. legacy=False
# gives no "▁" after a special token, so each role name and the answer after "assistant\n" start bare; "\n" is a
# piece of its own. The text after <image> is tokenized alone (LLaVA's tokenizer_image_token) and gets its "▁".

START, END = "<|im_start|>", "<|im_end|>"
USER = [START, "us", "er", "\n"]
ASSISTANT = [START, "a", "ss", "istant", "\n"]


def test_chatml_direct_ids_by_hand(yi_tok):
    tok = yi_tok
    parts = [
        (["<s>", START, "s", "y", "s", "t", "em", "\n", "A", "ns", "wer", "▁the", "▁questio", "ns", ".", END] + USER
         + ["<image>", "▁", "\n", "W", "hat", "▁is", "▁in", "▁the", "▁image", "?", END] + ASSISTANT, False),
        (["A", "▁c", "at", ".", END], True),
        (USER + ["Is", "▁there", "▁a", "▁dog", "?", END] + ASSISTANT, False),
        (["Y", "es", ".", END], True),
    ]
    ids, labels = tokenize_conversation(conv("What is in the image?\n<image>", "A cat.", "Is there a dog?", "Yes."),
                                        tok, "chatml_direct")
    assert tok.convert_ids_to_tokens(ids.tolist()) == [p for ps, _ in parts for p in ps]
    assert (labels != IGNORE_INDEX).tolist() == [t for ps, t in parts for _ in ps]
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    # the specials follow the 481 ids of the SentencePiece model (<unk> <s> </s> = 0 1 2)
    assert tok.convert_tokens_to_ids([START, END]) == [481, 482] and ids[:2].tolist() == [1, 481]
    assert ids[-1].item() == 482 == tok.eos_token_id


def test_chatml_direct_prompt_is_a_prefix_and_stops_at_im_end(yi_tok, tmp_path):
    t = get_template("chatml_direct")
    turns = conv("<image>\nWhat is in the first image?", "A cat.", "And this one?\n<image>", "Two dogs.", "How many?",
                 "3")
    for k in range(3):
        prompt = tokenize_prompt(turns[: 2 * k + 1], yi_tok, "chatml_direct")
        ids, labels = tokenize_conversation(turns[: 2 * k + 2], yi_tok, "chatml_direct")
        assert ids[: len(prompt)].tolist() == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    assert t.stop_ids(yi_tok) == [[482]]  # EOS is <|im_end|>
    base = load_tokenizer(write_llama_tokenizer(tmp_path / "base"))  # EOS </s>, as the base Yi's <|endoftext|>
    base.add_special_tokens({"additional_special_tokens": [START, END]})
    assert t.stop_ids(base) == [[2], [base.convert_tokens_to_ids(END)]]


def test_a_tokenizer_without_chatml_is_refused(llama_tok):
    with pytest.raises(ValueError, match="template 'chatml_direct'.*'<|im_end|>'.*special token"):
        tokenize_conversation(conv("<image>\nQ?", "A."), llama_tok, "chatml_direct")


def llava_preprocess_mpt_lengths(tok, text):
    """LLaVA's preprocess_mpt (the mask its version "mpt", conv_chatml_direct's, selects), restated on one sample:
    the text split on "<|im_end|>", regrouped into rounds (system + user + gpt, then user + gpt), each round
    tokenized alone by tokenizer_image_token (BOS kept, <image> one id); returns (the length it sums, the
    sample's length). Where they differ it masks the whole sample ("WARNING: tokenization mismatch")."""
    def tokens(s):
        chunks = [tok(c).input_ids for c in s.split("<image>")]
        first = chunks[0][:1] if chunks[0][:1] == [tok.bos_token_id] else []
        return first + [i for k, c in enumerate(chunks) for i in ([-200] if k else []) + c[len(first):]]
    rounds = text.split(END)
    grouped = [END.join(rounds[:3])] + [END.join(rounds[i: i + 2]) for i in range(3, len(rounds), 2)]
    counted = sum(len(tokens(r)) for r in grouped if r and len(r.split(END + "<|im_start|>assistant\n")) == 2)
    return counted, len(tokens(text))


@pytest.mark.parametrize("turns", [CONVERSATIONS[1], CONVERSATIONS[2][:4]], ids=["one round", "two rounds"])
def test_llavas_mpt_mask_would_drop_every_sample(yi_tok, turns):
    """Its split drops the "<|im_end|>" that closes each answer from the count, so the sum never meets the length:
    LLaVA's public code would train nothing on chatml_direct. Hence ours: each answer and its "<|im_end|>"."""
    counted, length = llava_preprocess_mpt_lengths(yi_tok, get_template("chatml_direct").render(turns).text)
    assert counted != length


# ------------------------------------------------------------------------------- picking for a directory
#
# The chat templates llava-hf ships, their structure as published: llava-1.5-*-hf and llava-v1.6-vicuna-*-hf
# (chat_template.json), llava-v1.6-mistral-7b-hf (chat_template.json, its "<\\s> " as written there), the 34B's
# ChatML as transformers' LLaVA-NeXT conversion writes it (chat_yi), llama3-llava-next-8b-hf's Llama-3 headers.

IMAGES_THEN_TEXT = ("{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
                    "'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}")
VICUNA_HF = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
             "{% endif %}" + IMAGES_THEN_TEXT + "{% for content in message['content'] | selectattr('type', 'equalto', "
             "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
             "{{ 'ASSISTANT:' }}{% endif %}")
MISTRAL_HF = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]"
              "['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}" + IMAGES_THEN_TEXT
              + "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
              "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]"
              "['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
              "{% endif %}{% endfor %}")
CHATML_HF = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}" + IMAGES_THEN_TEXT
             + "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
             "{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_HF = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}"
             "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
             "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
             "{{ '\\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def model_dir(path, decoder="llama", **files):
    """A model directory: config.json with a llava-hf text_config of model_type `decoder`, and `files`
    (file name -> text)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llava_next", "text_config": {"model_type": decoder}}))
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


def picked(capsys, path, *extra):
    """(template, stderr note) that chat's command line picks for `path`."""
    template = chat.parse_args(["--model", str(path), *extra]).template
    return template, capsys.readouterr().err


@pytest.mark.parametrize("jinja, decoder, expected, why", [
    (VICUNA_HF, "llama", "vicuna_v1", "USER: / ASSISTANT: turns"),
    (MISTRAL_HF, "mistral", "mistral_instruct", "[INST] turns"),
    (CHATML_HF, "llama", "chatml_direct", "ChatML turns (LLaVA-1.6-34B)"),  # Yi-34B is a LLaMA decoder
    (CHATML_HF, "qwen2", "qwen", "ChatML turns and the decoder is qwen2"),
    (LLAMA3_HF, "llama", "llama3", "Llama-3 headers"),
], ids=["vicuna", "mistral", "yi", "qwen", "llama3"])
def test_a_llava_hf_chat_template_names_the_template(tmp_path, capsys, jinja, decoder, expected, why):
    path = model_dir(tmp_path / "m", decoder, chat_template__json=json.dumps({"chat_template": jinja}))
    template, note = picked(capsys, path)
    assert template == expected
    assert f"{path / 'fastllava.json'} does not name the model's conversation template; prompting in {expected}" in note
    assert "chat_template.json" in note and why in note, note


def test_every_place_a_chat_template_is_kept(tmp_path, capsys):
    # transformers 5 saves a processor's template as chat_template.jinja; older ones in processor_config.json; a
    # tokenizer's in tokenizer_config.json, a string or a list of named templates
    cases = {"chat_template__jinja": MISTRAL_HF, "processor_config__json": json.dumps({"chat_template": MISTRAL_HF}),
             "tokenizer_config__json": json.dumps({"chat_template": [{"name": "tool_use", "template": VICUNA_HF},
                                                                     {"name": "default", "template": MISTRAL_HF}]})}
    for k, (name, text) in enumerate(cases.items()):
        path = model_dir(tmp_path / str(k), "mistral", **{name: text})
        template, note = picked(capsys, path)
        assert template == "mistral_instruct" and name.replace("__", ".") in note, note
    # the processor's template is read before the tokenizer's (a decoder's own)
    path = model_dir(tmp_path / "both", chat_template__json=json.dumps({"chat_template": CHATML_HF}),
                     tokenizer_config__json=json.dumps({"chat_template": MISTRAL_HF}))
    assert picked(capsys, path)[0] == "chatml_direct"


def test_the_record_and_the_command_line_come_first(tmp_path, capsys):
    path = model_dir(tmp_path / "m", chat_template__json=json.dumps({"chat_template": MISTRAL_HF}),
                     fastllava__json=json.dumps({"template": "qwen"}))
    assert picked(capsys, path) == ("qwen", "")
    assert picked(capsys, path, "--template", "v0") == ("v0", "")


@pytest.mark.parametrize("name, expected", [
    ("llava-v1.6-mistral-7b", "mistral_instruct"), ("llava-v1.6-34b", "chatml_direct"),
    ("llava-v1.6-vicuna-13b", "vicuna_v1"), ("llava-v1.5-7b", "vicuna_v1")])
def test_without_a_chat_template_llavas_name_rule(tmp_path, capsys, name, expected):
    """The original layout ships no chat template; LLaVA's llava/serve/cli.py picks by the directory's name."""
    path = model_dir(tmp_path / name, tokenizer_config__json=json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    template, note = picked(capsys, path)
    assert template == expected and "it ships no chat template" in note, note
    assert ("LLaVA's llava/serve/cli.py rule" in note) == (expected != "vicuna_v1")
    # a trainer's checkpoint-N directory goes by its parent's name too (LLaVA's get_model_name_from_path)
    checkpoint = model_dir(path / "checkpoint-100")
    assert model_template(checkpoint) == expected


@pytest.mark.parametrize("jinja, why", [
    ("{{ messages[0]['content'] }}", "writes none of '[INST]'"),
    (MISTRAL_HF + CHATML_HF, "writes [INST] turns (LLaVA-1.6-Mistral-7B) and ChatML turns"),
], ids=["unknown", "ambiguous"])
def test_an_unrecognised_chat_template_falls_back_with_the_reason(tmp_path, capsys, jinja, why):
    path = model_dir(tmp_path / "m", chat_template__json=json.dumps({"chat_template": jinja}))
    template, note = picked(capsys, path)
    assert template == "vicuna_v1" and why in note and "LLaVA-1.5's is the default" in note, note


def test_an_unreadable_chat_template_file_is_named(tmp_path, capsys):
    path = model_dir(tmp_path / "m", chat_template__json="{not json")
    with pytest.raises(SystemExit) as e:
        chat.parse_args(["--model", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path / 'chat_template.json'}: cannot read it as a JSON object" in err, err
