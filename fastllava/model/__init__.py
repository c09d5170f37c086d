"""The LLaVA model: CLIP vision tower, projector, LLaMA decoder, and Hugging Face checkpoint interop."""

from .config import Backends, LlavaConfig, TextConfig, VisionConfig
from .llava import Llava, LlavaOutput

__all__ = ["Backends", "Llava", "LlavaConfig", "LlavaOutput", "TextConfig", "VisionConfig"]
