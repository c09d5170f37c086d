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
