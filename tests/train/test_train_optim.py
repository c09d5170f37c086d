"""AdamW groups, the schedule against transformers' own, and gradient clipping against torch's."""

import math

import pytest
import torch
from torch import nn

from fastllava.config import OptimConfig
from fastllava.train.freeze import set_trainable
from fastllava.train.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor, param_groups

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


@pytest.mark.parametrize("total, ratio", [(100, 0.03), (7, 0.2), (50, 0.0)])
def test_cosine_matches_transformers(total, ratio):
    from transformers import get_cosine_schedule_with_warmup

    cfg = OptimConfig(lr=1.0, warmup_ratio=ratio)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_cosine_schedule_with_warmup(ref_opt, math.ceil(ratio * total), total)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = build_scheduler(opt, cfg, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12), step
        assert lr_factor(step, total, cfg) == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ref_opt.step(), opt.step(), ref.step(), ours.step()


def test_clip_matches_torch():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [nn.Parameter(torch.randn(4))]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        g = torch.randn_like(p) * 3
        p.grad, r.grad = g.clone(), g.clone()
    params[-1].grad = ref[-1].grad = None  # a parameter without a gradient is skipped
    norm = clip_grad_norm(params, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6) and norm > 1.0
    for p, r in zip(params[:-1], ref[:-1]):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    assert clip_grad_norm(params, 0.0) == pytest.approx(1.0, rel=1e-5)  # 0 disables clipping, still reports


def test_optimizer_holds_only_trainable_parameters():
    model = tiny_model()
    set_trainable(model, "align")
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.projector.parameters()}
