"""Stage 1 (align): only the projector trains, on image-caption pairs; vision tower and LLM are frozen.

    torchrun [--nproc_per_node=N] recipes/pretrain.py [--config FILE] [section.key=value ...]

The paper's recipes: --config recipes/configs/llava15_{7b,13b}_pretrain.yaml; their projector.safetensors
is what stage 2 starts from (model.projector_weights). Without --config: a tiny demo on the demo world's
captions (fastllava/demo/).
"""

import sys

from fastllava import demo
from fastllava.train import main

if __name__ == "__main__":
    main(sys.argv[1:], "align", description=__doc__, without_config=demo.prepare,
         without_config_help=demo.help_text)
