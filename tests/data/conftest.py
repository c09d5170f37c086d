"""Shared fixtures for the data tests: tokenizers trained here, offline, in well under a second.

llama_tok_dir  a LLaMA-like SentencePiece BPE (byte_fallback, add_dummy_prefix, <unk>/<s>/</s> = 0/1/2)
               saved as tokenizer.model, so transformers converts it to its fast LlamaTokenizer exactly
               as it does for a real LLaMA/Vicuna checkpoint directory.
bpe_tok_dir    a byte-level BPE (GPT-2 style) from the tokenizers library, saved as tokenizer.json.
Both directories are loaded through fastllava.data.tokenize.load_tokenizer (AutoTokenizer, local only).
"""

import io
import json

import pytest

CORPUS = [
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


def _write_llama_dir(path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30),
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


def _write_bpe_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 30, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def llama_tok_dir(tmp_path_factory):
    return _write_llama_dir(tmp_path_factory.mktemp("llama_tok"))


@pytest.fixture(scope="session")
def bpe_tok_dir(tmp_path_factory):
    return _write_bpe_dir(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def llama_tok(llama_tok_dir):
    from fastllava.data.tokenize import load_tokenizer

    return load_tokenizer(llama_tok_dir)


@pytest.fixture(scope="session")
def bpe_tok(bpe_tok_dir):
    from fastllava.data.tokenize import load_tokenizer

    return load_tokenizer(bpe_tok_dir)
