"""fastllava: efficiency-first training of LLaVA-style vision-language models."""

from .batch import IGNORE_INDEX, PackedBatch

__all__ = ["IGNORE_INDEX", "PackedBatch"]
