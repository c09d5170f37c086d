"""The embedded demo: what `torchrun recipes/finetune.py` (and recipes/pretrain.py) run without --config.

A generated shapes-VQA world with a tokenizer (world.py), a tiny tower pretrained CLIP-style and a tiny
random LLM written as ordinary checkpoint directories (tower.py, components.py), the real trainer on them,
and a held-out score per question type (score.py); run.py ties them together. Nothing outside this package
imports it except the recipes' no-argument path.
"""

from .run import help_text, prepare

__all__ = ["help_text", "prepare"]
