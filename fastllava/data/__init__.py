"""Data pipeline: LLaVA JSON files -> conversations with exact labels -> images -> packs -> PackedBatch."""

from .dataset import LlavaDataset
from .files import Records, RejectLog, SampleError, load_records
from .images import CLIP_MEAN, CLIP_STD, ImageError, load_image, load_images
from .packing import PackingPlanner, StepPlan, collate_pack, plan_packs, plan_stats, plan_steps
from .templates import TEMPLATES, get_template
from .tokenize import load_tokenizer, prepare_tokenizer, tokenize_conversation

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ImageError", "LlavaDataset", "PackingPlanner", "Records", "RejectLog", "SampleError",
    "StepPlan", "TEMPLATES", "collate_pack", "get_template", "load_image", "load_images", "load_records",
    "load_tokenizer", "plan_packs", "plan_stats", "plan_steps", "prepare_tokenizer", "tokenize_conversation",
]
