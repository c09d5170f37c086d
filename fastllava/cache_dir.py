"""Where fastllava keeps what it can recompute: dataset length tables, generated datasets.

One directory, `$FASTLLAVA_CACHE` (default `~/.cache/fastllava`). Everything in it is keyed by what it
was computed from, so deleting it only costs time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$FASTLLAVA_CACHE/<parts...>` (not created)."""
    root = os.environ.get("FASTLLAVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastllava")
    return Path(root, *parts)
