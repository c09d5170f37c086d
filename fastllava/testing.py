"""Tiny models for tests and CPU benchmarks: one shape, one factory, shared by tests/ and benchmarks/.

A tiny LLaVA has every feature of the real one (CLIP tower with layers after the selected one, a
two-layer projector, a GQA-capable LLaMA decoder) at sizes that run in milliseconds on a CPU. Its
transformers twin (`tiny_hf_llava`) is the independent reference the model tests compare against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import Backends, Llava, LlavaConfig, TextConfig, VisionConfig

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                   patch_size=14)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64)
TINY_IMAGE_TOKEN = 120
# The torch references everywhere: exact on CPU, and what the kernels are tested against.
TORCH_BACKENDS = Backends(attention="torch", projector="torch", merge="torch", loss="torch")


def tiny_config(*, vision: dict | None = None, text: dict | None = None, **fields) -> LlavaConfig:
    """The tiny LLaVA; `vision` and `text` patch its parts, other keywords are LlavaConfig fields
    (projector_type, vision_feature_layer, image_token_id, ...)."""
    return LlavaConfig(vision=VisionConfig(**{**TINY_VISION, **(vision or {})}),
                       text=TextConfig(**{**TINY_TEXT, **(text or {})}),
                       **{"image_token_id": TINY_IMAGE_TOKEN, **fields})


def tiny_model(config: LlavaConfig | None = None, *, seed: int = 0, backends: Backends = TORCH_BACKENDS) -> Llava:
    """A randomly initialized Llava of `config` (default tiny_config()), fp32, torch backends."""
    return Llava.from_config(config or tiny_config(), seed=seed, backends=backends)


def tiny_hf_llava(config: LlavaConfig | None = None, *, seed: int = 0):
    """transformers' LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for an AnyRes config) of
    the same architecture, eval mode, with random weights everywhere: transformers' own init leaves norms at 1
    and biases at 0, which would hide mistakes in them."""
    import transformers

    config = config or tiny_config()
    kind = "LlavaNext" if config.anyres is not None else "Llava"
    hf_config = getattr(transformers, f"{kind}Config").from_dict(config.to_hf_llava())
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            p.copy_(torch.randn_like(p) * (0.1 if is_norm else 0.2) + (is_norm and name.endswith("weight")))
    return model


TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a red sofa.",
    "USER: Is there a dog? ASSISTANT: Yes, there is a small dog next to the window.",
    "Answer the question using a single word or phrase.",
    "What color is the car? Blue. How many people are there? Two.",
    "Describe the image in detail. The photo shows a busy street with cars and people.",
    "Café naïve résumé 日本語のテスト. Ünïcödé text.",
    "Write a poem about the sea.\nThe sea is wide,\nthe sea is deep.",
    "def f(x):\n    return x + 1",
]


def write_llama_tokenizer(path: Path) -> Path:
    """A LLaMA-like SentencePiece BPE (byte fallback, dummy prefix, <unk>/<s>/</s> = 0/1/2) saved as
    tokenizer.model in `path`, which transformers converts to its fast LlamaTokenizer as it does a real
    LLaMA/Vicuna directory's. Trained on TOKENIZER_CORPUS in well under a second."""
    import io
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 30),
        model_writer=model,
        vocab_size=480,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                    "model_max_length": 2048})
    )
    return path


def write_bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE (GPT-2 style, BOS added, no dummy prefix) saved as tokenizer.json in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS * 30, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


# The pre-tokenizer regexes of the real tokenizer.json files: Llama-3's (tiktoken's cl100k: digits in runs of
# up to 3) and Qwen2's (one digit per token).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_regex_bpe(path: Path, split: str, specials: list[str], bos: str | None, **tokens: str) -> Path:
    """A byte-level BPE with a regex pre-tokenizer as Llama-3's and Qwen2's tokenizer.json have it, trained on
    TOKENIZER_CORPUS and the LLaVA-NeXT system prompts, its special tokens added after the learned vocabulary
    (their ids are the last, as in the real ones), BOS put in front by the post-processor when `bos` is set.
    tokens: bos_token / eos_token / pad_token names for transformers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .data.templates import LLAMA3_SYSTEM, QWEN_SYSTEM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # The role names as the chat formats write them (after a special token, before "\n" or "\n\n").
    roles = "system\n\nuser\nassistant\n\n"
    tok.train_from_iterator((TOKENIZER_CORPUS + [LLAMA3_SYSTEM, QWEN_SYSTEM, roles]) * 30, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                   special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    PreTrainedTokenizerFast(tokenizer_object=tok, **tokens).save_pretrained(str(path))
    return path


def write_llama3_tokenizer(path: Path) -> Path:
    """A byte-level BPE shaped like Llama-3.x Instruct's: Llama-3's pre-tokenizer regex, BOS <|begin_of_text|>
    put in front by the post-processor, <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>
    special, EOS <|eot_id|> (the Instruct models' tokenizer_config), no unk and no pad."""
    return _write_regex_bpe(Path(path), LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                       "<|end_header_id|>", "<|eot_id|>"],
                            "<|begin_of_text|>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def write_qwen2_tokenizer(path: Path) -> Path:
    """A byte-level BPE shaped like Qwen2/2.5 Instruct's: Qwen2's pre-tokenizer regex, ChatML's <|im_start|>
    <|im_end|> and <|endoftext|> special, no BOS, EOS <|im_end|>, pad <|endoftext|> (the Instruct models'
    tokenizer_config), no unk."""
    return _write_regex_bpe(Path(path), QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                            eos_token="<|im_end|>", pad_token="<|endoftext|>")


def write_tiny_llava(path: Path, *, seed: int = 0, vision: dict | None = None) -> Path:
    """A tiny random Llava saved as a llava-hf directory WITH a tokenizer (write_llama_tokenizer's, <image>
    added as LLaVA adds it): what `python -m fastllava.chat` and `python -m fastllava.eval` load. Its
    vocabulary holds the tokenizer's 481 ids, padded to 512. vision: patches the tower (tiny_config)."""
    from .data.tokenize import load_tokenizer

    path = Path(path)
    tokenizer = load_tokenizer(write_llama_tokenizer(path))
    model = tiny_model(tiny_config(vision=vision, text={"vocab_size": 512},
                                   image_token_id=tokenizer.convert_tokens_to_ids("<image>")), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path
