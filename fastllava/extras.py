"""Optional packages: which extra installs each, and the one error a missing one raises.

A feature that needs an optional package imports it through `require(module, feature)` when the feature
is asked for. A missing package raises MissingExtra, whose message is one line naming the feature and the
install command, e.g.

    python -m fastllava.datagen needs the openai package, which is not installed: pip install "fastllava[datagen]"

The command works for an editable clone too: pip reads the extra from the installed fastllava's metadata and
installs only what is missing. A command-line entry wrapped in `cli` prints that line (no traceback) and
exits with status 2, the status of every other argument or configuration error.

This module imports nothing of fastllava, so any layer, ops/ included, may use it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

# module -> (the pip distribution that provides it, the extra of pyproject.toml that installs it).
# tests/test_extras.py checks each pair against pyproject.toml.
EXTRAS = {
    "openai": ("openai", "datagen"),
    "nvidia.dali": ("nvidia-dali-cuda120", "dali"),
    "matplotlib": ("matplotlib", "plot"),
    "torch.utils.tensorboard": ("tensorboard", "logging"),
    "wandb": ("wandb", "logging"),
    "flash_attn": ("flash-attn", "flash-attn"),
    "xformers": ("xformers", "xformers"),
    "pyarrow": ("pyarrow", "hub-eval"),
}
# flash-attn builds against the installed torch, which pip's isolated build environment does not have
# (its README installs it with --no-build-isolation).
PIP_OPTIONS = {"flash-attn": "--no-build-isolation "}


def _entry(module: str) -> tuple[str, str]:
    """EXTRAS' row for `module` or the package above it ("xformers.ops" -> "xformers")."""
    name = module
    while name not in EXTRAS:
        if "." not in name:
            raise KeyError(f"{module!r} is not an optional package of fastllava; add it to extras.EXTRAS")
        name = name.rpartition(".")[0]
    return EXTRAS[name]


def install_command(module: str) -> str:
    """The pip command that installs `module`'s extra: 'pip install "fastllava[plot]"'."""
    extra = _entry(module)[1]
    return f'pip install {PIP_OPTIONS.get(extra, "")}"fastllava[{extra}]"'


class MissingExtra(ImportError):
    """An optional package a requested feature needs is not installed (or fails to import).

    An ImportError, so `except ImportError` fallbacks keep working; `cli` turns it into one line and exit 2."""

    def __init__(self, feature: str, module: str, cause: ImportError | None = None):
        package = _entry(module)[0]
        # A package that is there but breaks on import (a missing CUDA library, a version clash) says why.
        missing = cause is None or (isinstance(cause, ModuleNotFoundError) and cause.name is not None
                                    and cause.name.split(".")[0] in (module.split(".")[0], package))
        why = "which is not installed" if missing else f"which fails to import ({cause})"
        super().__init__(f"{feature} needs the {package} package, {why}: {install_command(module)}",
                         name=module)
        self.feature = feature


def require(module: str, feature: str) -> ModuleType:
    """`module` imported, or MissingExtra naming `feature` (what the user asked for, e.g.
    "logging.wandb=true") and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(feature, module, e) from e


def cli(main):
    """Wrap a command-line `main` so that MissingExtra ends it with one line on stderr and status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except MissingExtra as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
