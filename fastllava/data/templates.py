"""Conversation templates: a conversation -> one prompt string plus the character spans that carry loss.

A template renders the whole conversation to the exact text the model reads, and returns, next to it, the
spans of that text whose tokens are trained on (each answer and the marker that ends it). Tokenization
and label masking from those spans live in tokenize.py; here only `Template.stop_ids` asks it how the
training text tokenizes the end of an answer (see "Where an answer ends" below).

Registered templates (LLaVA's llava/conversation.py + llava/train/train.py, strings reproduced exactly):

  plain      stage 1 (conv_llava_plain + preprocess_plain): the human turn is replaced by its image
             tag(s) alone, then the caption, then "\n":  "<image>" + caption + "\n". Loss on caption + "\n".
  vicuna_v1  stage 2 (conv_vicuna_v1, SeparatorStyle.TWO, sep " ", sep2 "</s>"):
             SYSTEM + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...
             with the <image> tag moved to the front of its human turn followed by "\n"
             (preprocess_multimodal). Loss on " " + each answer + its "</s>" (the space after
             "ASSISTANT:" is in the loss span: the tokenizer merges it into the answer's first token).
  v0         the first LLaVA, stages 1 and 2 (conv_vicuna_v0 + the default `preprocess` path with
             _add_speaker_and_signal, BEGIN_SIGNAL "### ", END_SIGNAL "\n", roles Human/Assistant):
             V0_SYSTEM + "\n\n" + "### Human: " + q1 + "\n" + "### Assistant: " + a1 + "\n" + "### Human: " ...
             + "### Assistant: " + aN + "\n" + "### " (LLaVA closes every conversation with a BEGIN_SIGNAL),
             the <image> tag moved to the front of its human turn as for vicuna_v1. Loss on " " + each
             answer + "\n###" (the answer and the "###" stop signal after it). LLaVA's own length arithmetic
             (_mask_targets) also trains the "###" opening the first human turn and every "### Assistant:"
             header; docs/data.md ("The v0 template") lists the differences.

LLaVA-NeXT's templates (LLaVA-VL/LLaVA-NeXT llava/conversation.py + llava/train/train.py), for decoders whose
instruct models were trained on their own chat format. The <image> tag goes as LLaVA-NeXT's
preprocess_multimodal puts it: a turn's single tag not already at its front is moved there followed by "\n";
a turn opening with its tag, or with several, keeps them where they stand.

  llama3     conv_llava_llama_3 + preprocess_llama3 (Meta-Llama-3-8B-Instruct's chat template, every message
             stripped as its `| trim` does): H(role) = "<|start_header_id|>" + role + "<|end_header_id|>\n\n",
             H("system") + LLAMA3_SYSTEM + "<|eot_id|>" + H("user") + q1 + "<|eot_id|>" + H("assistant") + a1
             + "<|eot_id|>" + H("user") + ...; BOS "<|begin_of_text|>" is the tokenizer's, as for every
             template. Loss on each answer + its "<|eot_id|>".
  qwen       conv_qwen + preprocess_qwen (ChatML): "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n" +
             "<|im_start|>user\n" + q1 + "<|im_end|>\n" + "<|im_start|>assistant\n" + a1 + "<|im_end|>\n" +
             "<|im_start|>user\n" ...; no BOS (Qwen's tokenizer adds none). Loss on each answer + its
             "<|im_end|>"; the "\n" after it, which generation never reaches, carries none.
  mistral    conv_mistral_instruct (SeparatorStyle.LLAMA_2, empty system, sep "", sep2 "</s>") + preprocess_llama_2:
             "[INST] " + q1 + " [/INST]" + " " + a1 + " " + "</s>" + "[INST] " + q2 + ...; BOS by the tokenizer.
             Loss on " " + each answer + " </s>" (the spaces as conv_mistral_instruct writes them).
  mistral_instruct  the same template under LLaVA's name for it (conv_templates["mistral_instruct"], the
             template of LLaVA-1.6-Mistral-7B): an alias, one Template.
  chatml_direct  conv_chatml_direct (LLaVA-1.6-34B on Nous-Hermes-2-Yi-34B; SeparatorStyle.MPT, sep "<|im_end|>",
             roles "<|im_start|>user\n" / "<|im_start|>assistant\n"): "<|im_start|>system\n" + CHATML_DIRECT_SYSTEM +
             "<|im_end|>" + "<|im_start|>user\n" + q1 + "<|im_end|>" + "<|im_start|>assistant\n" + a1 + "<|im_end|>" +
             "<|im_start|>user\n" ...: ChatML with nothing after each "<|im_end|>" (qwen writes "\n"). BOS by the
             tokenizer. Loss on each answer + its "<|im_end|>", as qwen: LLaVA's preprocess_mpt, the mask its
             version "mpt" selects, counts lengths without each answer's "<|im_end|>" and so masks every sample
             whole (docs/data.md, "The LLaVA-NeXT templates"); LLaVA-1.6-34B's training code is not public.
  LLaVA-NeXT's own masks train more than these (role headers, every end token, "\n"s): docs/data.md,
  "The LLaVA-NeXT templates".

`Template.render(turns)` never adds BOS: the tokenizer does, as at inference.

`Template.render_prompt(turns)` is the generation prompt for turns that end with a human turn: the text
render() gives for the same turns plus an answer, cut where that answer's loss span starts, i.e. where the
model starts answering. So it is a prefix of the training text by construction, and it is LLaVA's
conv.get_prompt() with the last assistant message None:
  vicuna_v1  SYSTEM + " " + "USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
  v0         V0_SYSTEM + "\n\n### Human: <image>\nQ1\n### Assistant: A1\n### Human: Q2\n### Assistant:"
             (the training format; LLaVA's conv_vicuna_v0.get_prompt() would give "V0_SYSTEM###Human: <image>\nQ1
             ###Assistant:", a format its training code never builds)
  plain      the image tag(s) alone: "<image>" (stage 1 trains on "<image>" + caption + "\n"; LLaVA's
             conv_llava_plain.get_prompt() would give "<image>\nQ\n", a format stage 1 never trains on)
  llama3     ... + H("user") + "<image>\nQ" + "<|eot_id|>" + H("assistant"): its tokenizer.apply_chat_template
             with add_generation_prompt=True, conv_llava_llama_3.get_prompt()
  qwen       ... + "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n", conv_qwen.get_prompt()
  mistral    "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]", conv_mistral_instruct.get_prompt()
  chatml_direct  "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>"
             + "<|im_start|>assistant\n", conv_chatml_direct.get_prompt() (llava-hf's llava-v1.6-34b-hf model card
             prompt)

Where an answer ends: every template's loss span closes with its `stop_str` (vicuna_v1 "</s>", v0 "###",
plain "\n", llama3 "<|eot_id|>", qwen and chatml_direct "<|im_end|>", mistral "</s>"), the marker the model is
trained to emit after an answer. `Template.stop_ids(tokenizer)` gives the token-id sequences of that marker as
the training text tokenizes it after an answer, plus EOS, and every generating path (eval, chat, the demo's
scoring) hands them to the generator's `stop=`: one rule, in token ids, so that a model trained on v0 stops at
"###" everywhere (LLaVA's KeywordsStoppingCriteria stops on the same string). The ids are read from the training
text, not from tokenizing the marker alone, because context changes them: SentencePiece gives "###" alone a
dummy-prefix "▁###", which the model never saw after "\n".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .files import IMAGE_TAG, SampleError, validate_turns

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# conv_vicuna_v0.system: "human" where vicuna_v1 says "user"
V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# conv_llava_llama_3.system, the system_message of preprocess_llama3
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# preprocess_qwen's system_message (conv_qwen's too; conv_qwen_2_5's "You are Qwen, created by Alibaba Cloud. ..."
# reaches only LLaVA-NeXT's inference: its training always writes this one)
QWEN_SYSTEM = "You are a helpful assistant."

# conv_chatml_direct.system after its "<|im_start|>system\n" (LLaVA's and LLaVA-NeXT's conversation.py alike)
CHATML_DIRECT_SYSTEM = "Answer the questions."


@dataclass(frozen=True)
class Rendered:
    """A conversation as the exact prompt text, with the spans that carry loss."""

    text: str  # the prompt, with one IMAGE_TAG per image, in order
    # [start, end) character ranges of `text` whose tokens carry loss: each answer with the marker that ends
    # it, and for vicuna_v1 and v0 the separator space before it (see _render_vicuna_v1, _render_v0)
    answer_spans: tuple[tuple[int, int], ...]
    num_images: int


@dataclass(frozen=True)
class Template:
    """A named conversation format (see the module docstring)."""

    name: str
    render: Callable[[Sequence[dict]], Rendered]  # turns: [{"from": "human"|"gpt", "value": str}, ...]
    stop_str: str  # what ends an answer: the tail of every answer span (generation stops on it: stop_ids)
    required_tokens: tuple[str, ...] = ()  # strings the tokenizer must keep as one token (e.g. "</s>")

    def stop_ids(self, tokenizer) -> list[list[int]]:
        """Token-id sequences that end an answer, for the generator's `stop=`: [EOS] (where the tokenizer
        has one) and `stop_str` as the training text tokenizes it right after an answer. Two stand-in answers,
        one ending in a letter and one in ".", cover tokenizers that merge the marker with a preceding
        period (a ".\n" token); where such a token ends an answer, its "." is cut with the marker."""
        from .tokenize import tokenize_texts

        stops = [] if tokenizer.eos_token_id is None else [[tokenizer.eos_token_id]]
        for answer in ("Yes", "Yes."):
            rendered = self.render([{"from": "human", "value": IMAGE_TAG + "\nIs it?"}, {"from": "gpt", "value": answer}])
            end = rendered.answer_spans[0][1]
            start = end - len(self.stop_str)
            assert rendered.text[start:end] == self.stop_str, f"{self.name}: an answer span must end with stop_str"
            # The image tag's id does not matter here: only the marker's tokens are kept.
            ((ids_L, offsets_L2),) = tokenize_texts([rendered.text], tokenizer, -1, offsets=True)
            # The tokens overlapping the marker (tokenize.py's overlap rule for loss spans).
            covering = (offsets_L2[:, 0] < end) & (offsets_L2[:, 1].clip(min=offsets_L2[:, 0] + 1) > start)
            ids = ids_L[covering].tolist()
            if ids and ids not in stops:
                stops.append(ids)
        return stops

    def render_prompt(self, turns: Sequence[dict]) -> str:
        """The generation prompt for turns [{"from": "human"|"gpt", "value": str}, ...] that end with a
        human turn: the text up to where the model starts answering (see the module docstring), with one
        IMAGE_TAG per image. Raises SampleError for turns that do not alternate human, gpt, ..., human or
        that this template cannot render."""
        turns = list(turns)
        if len(turns) % 2 == 0:
            raise SampleError("roles", f"{len(turns)} turns: a prompt ends with a human turn")
        # Render with a stand-in answer and cut where its loss span starts: the text before it does not
        # depend on the answer, and reusing render() keeps prompt and training text one format.
        full = turns + [{"from": "gpt", "value": "answer"}]
        validate_turns(full)
        rendered = self.render(full)
        return rendered.text[: rendered.answer_spans[-1][0]]


def move_image_tags_to_front(value: str) -> str:
    """LLaVA's preprocess_multimodal for one human turn: drop every <image> tag where it stands, strip,
    and put one "<image>\n" per tag in front (LLaVA only ever has one; several keep their count)."""
    n = value.count(IMAGE_TAG)
    if n == 0:
        return value
    rest = value.replace(IMAGE_TAG, "").strip()
    return ((IMAGE_TAG + "\n") * n + rest).strip()


def move_single_image_tag_to_front(value: str) -> str:
    """LLaVA-NeXT's preprocess_multimodal for one human turn: a single <image> tag not at the front is
    dropped where it stands and "<image>\n" put in front of the stripped rest; a turn opening with its tag,
    or with several (interleaved images), is left as it is."""
    if value.count(IMAGE_TAG) != 1 or value.startswith(IMAGE_TAG):
        return value
    return (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip()


def _render_rounds(turns: Sequence[dict], head: str, question: Callable[[str], str],
                   answer: Callable[[str], tuple[str, str]]) -> Rendered:
    """The shape the LLaVA-NeXT templates share: `head`, then per round question(q) and the two parts of
    answer(a): (the loss span, the text after it). Human turns go through move_single_image_tag_to_front
    first."""
    text, spans, n_images = head, [], 0
    for j in range(0, len(turns), 2):
        q = move_single_image_tag_to_front(turns[j]["value"])
        n_images += q.count(IMAGE_TAG)
        trained, after = answer(turns[j + 1]["value"])
        text += question(q)
        spans.append((len(text), len(text) + len(trained)))
        text += trained + after
    return Rendered(text, tuple(spans), n_images)


def _llama3_header(role: str) -> str:
    return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"


def _render_llama3(turns: Sequence[dict]) -> Rendered:
    # Llama-3's chat template writes each message as H(role) + content|trim + "<|eot_id|>", nothing between
    # messages. The assistant header ends the question's part: the prompt ends with it, as with
    # add_generation_prompt, and the answer's first token cannot merge with "\n\n" (trimmed answers start
    # with a non-space, which the pre-tokenizer's rules split from newlines).
    return _render_rounds(
        turns, _llama3_header("system") + LLAMA3_SYSTEM + "<|eot_id|>",
        lambda q: _llama3_header("user") + q.strip() + "<|eot_id|>" + _llama3_header("assistant"),
        lambda a: (a.strip() + "<|eot_id|>", ""))


def _render_qwen(turns: Sequence[dict]) -> Rendered:
    # preprocess_qwen's chat template: "<|im_start|>" + role + "\n" + content + "<|im_end|>" + "\n", contents
    # as they are (no trim).
    return _render_rounds(
        turns, "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n",
        lambda q: "<|im_start|>user\n" + q + "<|im_end|>\n" + "<|im_start|>assistant\n",
        lambda a: (a + "<|im_end|>", "\n"))


def _render_mistral(turns: Sequence[dict]) -> Rendered:
    # conv_mistral_instruct.get_prompt(): "[INST] " + q + " [/INST]" per human turn, " " + a + " " + "</s>" per
    # answer. As in vicuna_v1, the space before the answer opens its loss span (SentencePiece merges it into
    # the answer's first token), so the prompt ends "[/INST]".
    return _render_rounds(turns, "", lambda q: "[INST] " + q + " [/INST]", lambda a: (" " + a + " </s>", ""))


def _render_chatml_direct(turns: Sequence[dict]) -> Rendered:
    # conv_chatml_direct.get_prompt() (SeparatorStyle.MPT): system + sep, then role + message + sep per message,
    # role alone for the answer to come; sep "<|im_end|>" and no "\n" after it. The assistant role ends with
    # "\n", which the answer's first token cannot merge with (a special token precedes it: a fresh piece).
    return _render_rounds(
        turns, "<|im_start|>system\n" + CHATML_DIRECT_SYSTEM + "<|im_end|>",
        lambda q: "<|im_start|>user\n" + q + "<|im_end|>" + "<|im_start|>assistant\n",
        lambda a: (a + "<|im_end|>", ""))


def _render_plain(turns: Sequence[dict]) -> Rendered:
    if len(turns) != 2:
        raise SampleError(
            "template", f"plain (stage-1) template needs one human and one gpt turn, got {len(turns)} turns"
        )
    n = turns[0]["value"].count(IMAGE_TAG)
    if n == 0:
        raise SampleError("template", "plain (stage-1) template needs an image in the human turn")
    prefix = IMAGE_TAG * n
    text = prefix + turns[1]["value"] + "\n"
    return Rendered(text, ((len(prefix), len(text)),), n)


def _render_vicuna_v1(turns: Sequence[dict]) -> Rendered:
    parts = [VICUNA_SYSTEM, " "]
    pos = len(VICUNA_SYSTEM) + 1
    spans = []
    n_images = 0
    for j in range(0, len(turns), 2):
        question = move_image_tags_to_front(turns[j]["value"])
        n_images += question.count(IMAGE_TAG)
        # The space after "ASSISTANT:" opens the loss span: SentencePiece/byte-level BPE attach it to the
        # answer's first token ("▁Yes"), and where it stands alone ("▁" "2") the reference trains on it.
        head = "USER: " + question + " " + "ASSISTANT:"
        answer = " " + turns[j + 1]["value"] + "</s>"
        parts += [head, answer]
        pos += len(head)
        spans.append((pos, pos + len(answer)))
        pos += len(answer)
    text = "".join(parts)
    assert pos == len(text)
    return Rendered(text, tuple(spans), n_images)


def _render_v0(turns: Sequence[dict]) -> Rendered:
    # LLaVA's string: header, then BEGIN_SIGNAL + role + ": " + value + END_SIGNAL per turn, then BEGIN_SIGNAL.
    # The loss opens at the space after "Assistant:" (merged into the answer's first token, as in vicuna_v1,
    # so the prompt ends "### Assistant:") and closes after the "###" that follows the answer's "\n": the
    # stop signal the model must emit. That "###" opens the next human turn (or LLaVA's closing "### "); the
    # space after it goes with what follows and carries no loss.
    text = V0_SYSTEM + "\n\n" + "###"
    spans = []
    n_images = 0
    for j in range(0, len(turns), 2):
        question = move_image_tags_to_front(turns[j]["value"])
        n_images += question.count(IMAGE_TAG)
        text += " Human: " + question + "\n" + "### Assistant:"
        start = len(text)
        text += " " + turns[j + 1]["value"] + "\n" + "###"
        spans.append((start, len(text)))
    return Rendered(text + " ", tuple(spans), n_images)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", _render_plain, stop_str="\n"),
    "vicuna_v1": Template("vicuna_v1", _render_vicuna_v1, stop_str="</s>", required_tokens=("</s>",)),
    "v0": Template("v0", _render_v0, stop_str="###"),
    # The end token first: a tokenizer of another family lacks it, and tokenize.py names the first one missing.
    "llama3": Template("llama3", _render_llama3, stop_str="<|eot_id|>",
                       required_tokens=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    "qwen": Template("qwen", _render_qwen, stop_str="<|im_end|>", required_tokens=("<|im_end|>", "<|im_start|>")),
    "mistral": Template("mistral", _render_mistral, stop_str="</s>", required_tokens=("</s>",)),
    "chatml_direct": Template("chatml_direct", _render_chatml_direct, stop_str="<|im_end|>",
                              required_tokens=("<|im_end|>", "<|im_start|>")),
}
# LLaVA's name for conv_mistral_instruct, which `mistral` already renders: the same Template, not a copy.
TEMPLATES["mistral_instruct"] = TEMPLATES["mistral"]


# How a model directory that records no template (a llava-hf release) says which one it was trained in: the chat
# template it ships (llava-hf's chat_template.json, its tokenizer's chat_template) writes the turns of one of ours.
# (what the Jinja text holds, our template, the format it names and the releases that use it)
CHAT_TEMPLATE_MARKERS = (
    ("[INST]", "mistral_instruct", "[INST] turns (LLaVA-1.6-Mistral-7B)"),
    ("<|start_header_id|>", "llama3", "Llama-3 headers (LLaVA-NeXT-8B on Llama-3)"),
    ("<|im_start|>", "chatml_direct", "ChatML turns (LLaVA-1.6-34B)"),
    ("ASSISTANT:", "vicuna_v1", "USER: / ASSISTANT: turns (LLaVA-1.5, LLaVA-1.6-Vicuna)"),
)


def template_of_chat_template(jinja: str, decoder: str | None = None) -> tuple[str | None, str]:
    """(our template, what the text writes) for a model whose chat template is the Jinja text `jinja` and whose
    decoder's model_type is `decoder`; (None, ...) where no marker, or more than one, is in the text. ChatML is
    chatml_direct's, but qwen's on a Qwen decoder (LLaVA-NeXT trains its Qwen models in conv_qwen)."""
    found = [(name, what) for marker, name, what in CHAT_TEMPLATE_MARKERS if marker in jinja]
    if len(found) != 1:
        return None, ("writes none of " + ", ".join(repr(m) for m, _, _ in CHAT_TEMPLATE_MARKERS) if not found
                      else "writes " + " and ".join(what for _, what in found))
    name, what = found[0]
    if name == "chatml_direct" and "qwen" in (decoder or ""):
        return "qwen", f"writes ChatML turns and the decoder is {decoder} (LLaVA-NeXT's Qwen models)"
    return name, f"writes {what}"


def get_template(template: str | Template) -> Template:
    """The registered template called `template` (a Template passes through); ValueError naming the known ones."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}") from None
