"""Kernel tests run in Triton's interpreter when there is no GPU. The flag must be set before any
module defining @triton.jit kernels is imported, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
