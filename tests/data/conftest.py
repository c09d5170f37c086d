"""Shared fixtures for the data tests: tokenizers trained here (fastllava.testing), offline, in well under a second.

llama_tok_dir  a LLaMA-like SentencePiece BPE (byte_fallback, add_dummy_prefix, <unk>/<s>/</s> = 0/1/2)
               saved as tokenizer.model, so transformers converts it to its fast LlamaTokenizer exactly
               as it does for a real LLaMA/Vicuna checkpoint directory.
bpe_tok_dir    a byte-level BPE (GPT-2 style) from the tokenizers library, saved as tokenizer.json.
Both directories are loaded through fastllava.data.tokenize.load_tokenizer (AutoTokenizer, local only).
"""

import pytest

from fastllava.testing import write_bpe_tokenizer, write_llama_tokenizer

@pytest.fixture(scope="session")
def llama_tok_dir(tmp_path_factory):
    return write_llama_tokenizer(tmp_path_factory.mktemp("llama_tok"))


@pytest.fixture(scope="session")
def bpe_tok_dir(tmp_path_factory):
    return write_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def llama_tok(llama_tok_dir):
    from fastllava.data.tokenize import load_tokenizer

    return load_tokenizer(llama_tok_dir)


@pytest.fixture(scope="session")
def bpe_tok(bpe_tok_dir):
    from fastllava.data.tokenize import load_tokenizer

    return load_tokenizer(bpe_tok_dir)
