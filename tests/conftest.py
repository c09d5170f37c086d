"""Kernel tests run in Triton's interpreter when there is no GPU. The flag must be set before any
module defining @triton.jit kernels is imported, so it is set here, first."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip themselves where there is no CUDA device (the marker is the only switch)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny random llava-hf directory with a SentencePiece tokenizer (fastllava.testing.write_tiny_llava):
    what the chat and eval command lines load."""
    from fastllava.testing import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
