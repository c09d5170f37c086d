"""python -m fastllava.eval: see fastllava/eval/run.py."""

import sys

from .run import main

sys.exit(main())
