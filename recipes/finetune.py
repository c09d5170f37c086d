"""Stage 2 (finetune): projector + LLM train on instruction data; the vision tower stays frozen.

    torchrun [--nproc_per_node=N] recipes/finetune.py [--config FILE] [section.key=value ...]

With no --config: the embedded demo (recipes/configs/demo_finetune.yaml), which generates a synthetic
visual-question dataset once, trains a tiny LLaVA from scratch on CPU or GPU, and prints its held-out
accuracy per question type. The paper's recipes: recipes/configs/llava15_{7b,13b}_finetune.yaml.
"""

import sys
from pathlib import Path

from fastllava.train import main

if __name__ == "__main__":
    main(sys.argv[1:], default_config=Path(__file__).parent / "configs" / "demo_finetune.yaml", stage="finetune")
