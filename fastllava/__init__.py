"""fastllava: efficiency-first training of LLaVA-style vision-language models."""

from .batch import IGNORE_INDEX, PackedBatch
from .model import Backends, Llava, LlavaConfig, LlavaOutput

__all__ = ["IGNORE_INDEX", "Backends", "Llava", "LlavaConfig", "LlavaOutput", "PackedBatch"]
