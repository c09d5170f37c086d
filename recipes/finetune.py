"""Stage 2 (finetune): projector + LLM train on instruction data; the vision tower stays frozen.

    torchrun [--nproc_per_node=N] recipes/finetune.py [--config FILE] [section.key=value ...]

The paper's recipes: --config recipes/configs/llava15_{7b,13b}_finetune.yaml. Without --config: the
embedded demo (fastllava/demo/): a generated shapes-VQA world, a tiny LLaVA trained on it on CPU or GPU,
and its held-out accuracy per question type.
"""

import sys

from fastllava import demo
from fastllava.train import main

if __name__ == "__main__":
    main(sys.argv[1:], "finetune", description=__doc__, without_config=demo.prepare,
         without_config_help=demo.help_text)
