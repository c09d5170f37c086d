"""AdamW groups, the learning-rate schedules at hand-worked steps, gradient clipping of FSDP2 shards."""

import math

import pytest
import torch
from torch import nn

from fastllava.config import OptimConfig
from fastllava.train.freeze import set_trainable
from fastllava.train.optim import build_optimizer, build_scheduler, clip_grad_norm, param_groups

from train_tiny import tiny_model


def test_groups_no_decay_on_biases_and_norms_and_projector_lr():
    model = tiny_model()
    set_trainable(model, "finetune")
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-4, projector_lr=1e-3, weight_decay=0.1))}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert set(groups) == {"model", "model_no_decay", "projector", "projector_no_decay"}
    assert all(n.startswith("projector.") for n in members["projector"] | members["projector_no_decay"])
    assert all("norm" in n or n.endswith("bias") for n in members["model_no_decay"] | members["projector_no_decay"])
    assert any("norm" in n for n in members["model_no_decay"])
    assert (groups["model"]["weight_decay"], groups["model_no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert (groups["projector"]["lr"], groups["model"]["lr"]) == (1e-3, 1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*members.values()) == trainable  # nothing dropped, nothing frozen included
    assert not any(n.startswith("vision_tower.") for n in trainable)


@pytest.mark.parametrize("schedule, expected", [
    # total 10 steps, warmup ceil(0.2 * 10) = 2 from lr 0 at step 0 (the reference's HF Trainer), then:
    ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 7 / 8))}),
    ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 9: 0.125}),
    ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 9: 1.0}),
])
def test_schedules_warm_up_then_decay(schedule, expected):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, OptimConfig(lr=2.0, warmup_ratio=0.2, schedule=schedule), 10)
    seen = {}
    for step in range(10):
        seen[step] = opt.param_groups[0]["lr"] / 2.0
        opt.step(), sched.step()
    for step, factor in expected.items():
        assert seen[step] == pytest.approx(factor, abs=1e-12), (schedule, step)


def test_clip_reduces_sharded_gradients():
    """Under FSDP2 every gradient is a DTensor shard: the norm is the full gradients' norm, and clipping
    scales every shard to it."""
    from fastllava.train.distributed import init_distributed, parallelize
    from fastllava.config import ParallelConfig

    env = init_distributed("cpu")
    model = tiny_model()
    set_trainable(model, "finetune")
    model = parallelize(model, ParallelConfig(activation_checkpointing="none"), env.device, stage="finetune")
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 * (i % 3 + 1))
    full = [p.grad.full_tensor().clone() for p in params]
    expected = torch.cat([g.double().flatten() for g in full]).norm().item()
    assert clip_grad_norm(params, 0.0) == pytest.approx(expected, rel=1e-5)  # 0: report, do not clip
    assert clip_grad_norm(params, 0.5) == pytest.approx(expected, rel=1e-5) and expected > 0.5
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad.full_tensor(), g * (0.5 / (expected + 1e-6)), rtol=1e-5, atol=1e-7)


def test_optimizer_holds_only_trainable_parameters():
    model = tiny_model()
    set_trainable(model, "align")
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.projector.parameters()}
