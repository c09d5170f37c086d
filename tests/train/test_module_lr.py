"""Per-module learning rates (optim.vision_lr beside optim.projector_lr): the configuration's checks."""

import re

import pytest

from fastllava.config import load_config

BASE = ["model.source=scratch", "model.architecture={}"]


@pytest.mark.parametrize("override, message", [
    (["optim.vision_lr=2e-6"], "optim.vision_lr=2e-06 sets the vision tower's learning rate, but the tower is "
                               "frozen (train.unfreeze_vision=false)"),
    (["optim.vision_lr=0", "train.unfreeze_vision=true"], "optim.vision_lr must be > 0, got 0"),
])
def test_vision_lr_errors(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, BASE + override)


def test_vision_lr_and_lora_with_an_unfrozen_tower_load():
    cfg = load_config(None, BASE + ["optim.vision_lr=2e-6", "train.unfreeze_vision=true", "lora.rank=8"])
    assert (cfg.optim.vision_lr, cfg.train.unfreeze_vision, cfg.lora.rank) == (2e-6, True, 8)
