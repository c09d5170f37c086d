"""The LLaVA model: CLIP vision tower, projector, LLaMA decoder, and Hugging Face checkpoint interop."""

from .config import LlavaConfig, TextConfig, VisionConfig
from .llava import Llava, LlavaOutput

__all__ = ["Llava", "LlavaConfig", "LlavaOutput", "TextConfig", "VisionConfig"]
