"""Instruction-data generation as in Visual Instruction Tuning (LLaVA, Liu et al. 2023, section 3): a
text-only model sees an image's captions and boxes and writes conversations, detailed descriptions or
reasoning Q&A, which become LLaVA training samples. Command line: `python -m fastllava.datagen --help`."""

from .annotations import Box, ImageContext, load_annotations
from .messages import KINDS, Prompt, load_prompt
from .run import DatagenConfig, Summary, run
from .validate import Invalid, to_conversations

__all__ = [
           "KINDS",
           "Box",
           "DatagenConfig",
           "ImageContext",
           "Invalid",
           "Prompt",
           "Summary",
           "load_annotations",
           "load_prompt",
           "run",
           "to_conversations",
]
