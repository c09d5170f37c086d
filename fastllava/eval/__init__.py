"""Evaluation of trained models: held-out visual question answering (the embedded demo's test)."""

from .vqa import evaluate_vqa, format_table, normalize_answer

__all__ = ["evaluate_vqa", "format_table", "normalize_answer"]
