"""Stage 1 (align): only the projector trains, on image-caption pairs; vision tower and LLM are frozen.

    torchrun [--nproc_per_node=N] recipes/pretrain.py [--config FILE] [section.key=value ...]

With no --config: a tiny demo (recipes/configs/demo_pretrain.yaml) on the synthetic captions. The
paper's recipes: recipes/configs/llava15_{7b,13b}_pretrain.yaml; their projector.safetensors is what
stage 2 starts from (model.projector_weights).
"""

import sys
from pathlib import Path

from fastllava.train import main

if __name__ == "__main__":
    main(sys.argv[1:], default_config=Path(__file__).parent / "configs" / "demo_pretrain.yaml", stage="align")
