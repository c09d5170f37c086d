"""fastllava's ops as torch custom ops: torch.library.opcheck on each op and backend (schema, fake
implementation against the real one, autograd registration, AOT dispatch with dynamic shapes), FLOP
formulas under FlopCounterMode, and a decoder block + projector + merge + fused loss compiled with
torch.compile(fullgraph=True) (aot_eager: no graph break, same values and gradients as eager).

Shapes are tiny: the Triton backends run in the interpreter, several times per opcheck.
"""

import importlib

import pytest
import torch
from tolerance import DEVICE as DEV
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

from fastllava.model.config import TextConfig
from fastllava.model.llama import DecoderLayer
from fastllava.model.rope import rotary_cos_sin
from fastllava.ops import (
    decode_attention,
    fused_linear_cross_entropy,
    fused_mlp_projector,
    merge_visual_tokens,
    varlen_attention,
)

va = importlib.import_module("fastllava.ops.varlen_attention")
fl = torch.ops.fastllava
CUDA = torch.cuda.is_available()
# Triton in fp16 where the compiled kernels run (they refuse fp32 on CUDA), fp32 in the interpreter.
TRITON_DTYPE = torch.float16 if CUDA else torch.float32


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def randn(*shape, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=DEV).requires_grad_(grad)


# ----------------------------------------------------------------------------------------------------
# opcheck


ATTENTION_CASES = [
    # backend, dtype, causal, Hq, Hkv
    ("torch", torch.float32, True, 4, 2),
    ("torch", torch.float64, False, 2, 2),
    ("triton", TRITON_DTYPE, True, 2, 1),
]


@pytest.mark.parametrize("backend, dtype, causal, Hq, Hkv", ATTENTION_CASES)
def test_opcheck_varlen_attention(backend, dtype, causal, Hq, Hkv):
    lengths, D = [5, 0, 9, 1], 64
    T = sum(lengths)
    q, k, v = randn(T, Hq, D, dtype=dtype, grad=True), randn(T, Hkv, D, dtype=dtype, grad=True, seed=1), \
        randn(T, Hkv, D, dtype=dtype, grad=True, seed=2)
    args = (q, k, v, cu_of(lengths), 9, causal, D ** -0.5, backend)
    opcheck(fl.varlen_attention, args)
    o, lse = fl.varlen_attention(*args)
    do = randn(T, Hq, D, dtype=dtype, seed=3)
    opcheck(fl.varlen_attention_backward, (do, *(x.detach() for x in (q, k, v, o, lse)), *args[3:]))


def test_opcheck_varlen_attention_recompute_path(monkeypatch):
    """The torch backend away from CPU (fp32 on CUDA) recomputes SDPA under torch.func.vjp in its
    backward: forced here on CPU, against the per-sample reference."""
    monkeypatch.setattr(va, "_use_cpu_flash", lambda x: False)
    lengths, Hq, Hkv, D = [4, 0, 7], 4, 2, 32
    T = sum(lengths)
    q, k, v = (randn(T, h, D, dtype=torch.float64, grad=True, seed=s) for s, h in enumerate((Hq, Hkv, Hkv)))
    cu = cu_of(lengths)
    opcheck(fl.varlen_attention, (q, k, v, cu, 7, False, 0.3, "torch"))
    o = varlen_attention(q, k, v, cu, 7, causal=False, softmax_scale=0.3, backend="torch")
    ref = va.varlen_attention_reference(q, k, v, cu, 7, causal=False, softmax_scale=0.3)
    do = randn(T, Hq, D, dtype=torch.float64, seed=5)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert (a - b).abs().max().item() < 1e-12
    assert (o - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("triton", TRITON_DTYPE)])
@pytest.mark.parametrize("save_pre", [True, False])
def test_opcheck_fused_mlp_projector(backend, dtype, save_pre):
    N, Din, Dh = 10, 24, 40
    x = randn(N, Din, dtype=dtype, grad=save_pre)
    w1, b1 = randn(Dh, Din, dtype=dtype, grad=save_pre, seed=1), randn(Dh, dtype=dtype, grad=save_pre, seed=2)
    w2, b2 = randn(Dh, Dh, dtype=dtype, grad=save_pre, seed=3), randn(Dh, dtype=dtype, grad=save_pre, seed=4)
    args = (x, w1, b1, w2, b2, save_pre, backend)
    opcheck(fl.fused_mlp_projector, args)
    if save_pre:
        _, h = fl.fused_mlp_projector(*args)
        needs = [False, True, True, True, True]  # x frozen, as the vision features are
        opcheck(fl.fused_mlp_projector_backward, (randn(N, Dh, dtype=dtype, seed=5), x.detach(), w1.detach(),
                                                  w2.detach(), h.detach(), needs, backend))


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("triton", TRITON_DTYPE)])
def test_opcheck_merge_visual_tokens(backend, dtype):
    ids = torch.tensor([1, 7, 7, 3, 2, 7, 4, 1], device=DEV)
    embed, feats = randn(9, 16, dtype=dtype, grad=True), randn(3, 16, dtype=dtype, grad=True, seed=1)
    opcheck(fl.merge_visual_tokens, (ids, embed, feats, 7, backend))
    opcheck(fl.merge_visual_tokens_backward, (randn(8, 16, dtype=dtype, seed=2), ids, 3, 9, 7, True, True, backend))


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("triton", TRITON_DTYPE)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_opcheck_fused_linear_cross_entropy(backend, dtype, reduction):
    T, D, V = 16, 16, 40
    hidden, weight = randn(T, D, dtype=dtype, grad=True), randn(V, D, dtype=dtype, grad=True, seed=1)
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(0)).to(DEV)
    labels[::4] = -100
    # Triton's backward scales the gradient buffers the forward returned IN PLACE (eager only; a traced
    # backward does it out of place), and opcheck compares the forward's outputs after running the
    # backward: its AOT test is replaced by test_fused_loss_compiles_with_each_backend.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if backend == "triton" else "ALL"
    opcheck(fl.fused_linear_cross_entropy, (hidden, weight, labels, -100, reduction, True, True, backend),
            test_utils=utils)
    opcheck(fl.fused_linear_cross_entropy, (hidden.detach(), weight.detach(), labels, -100, reduction, False, False,
                                            backend))


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("triton", TRITON_DTYPE)])
def test_fused_loss_compiles_with_each_backend(backend, dtype):
    torch._dynamo.reset()
    T, D, V = 16, 16, 40
    hidden, weight = randn(T, D, dtype=dtype, grad=True), randn(V, D, dtype=dtype, grad=True, seed=1)
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(0)).to(DEV)
    labels[::4] = -100

    def loss_fn(h, w, y):
        return 3.0 * fused_linear_cross_entropy(h, w, y, reduction="mean", backend=backend)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        loss = fn(hidden, weight, labels)
        results.append([loss.detach(), *torch.autograd.grad(loss, (hidden, weight))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("triton", TRITON_DTYPE)])
def test_opcheck_decode_attention(backend, dtype):
    B, Hq, Hkv, D, S, L = 3, 4, 2, 64, 4, 9
    q, k, v = randn(B, Hq, D, dtype=dtype), randn(S, L, Hkv, D, dtype=dtype, seed=1), \
        randn(S, L, Hkv, D, dtype=dtype, seed=2)
    slots = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEV)
    lengths = torch.tensor([9, 1, 4], dtype=torch.int32, device=DEV)
    opcheck(fl.decode_attention, (q, k, v, slots, lengths, D ** -0.5, backend))


# ----------------------------------------------------------------------------------------------------
# FLOP formulas


def _plain_attention_flops(q, k, v, lengths):
    """(forward, backward) FlopCounterMode counts of attention written as plain matmuls, one sample at a
    time, K/V heads repeated to Q's: torch's own bmm formulas and autograd, no fastllava code."""
    group, fwd, bwd, start = q.shape[1] // k.shape[1], 0, 0, 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].detach().transpose(0, 1).requires_grad_() for x in (q, k, v))
        start += n
        with FlopCounterMode(display=False) as counter:
            scores = qs @ ks.repeat_interleave(group, 0).transpose(1, 2)
            out = scores.softmax(-1) @ vs.repeat_interleave(group, 0)
        fwd += counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        bwd += counter.get_total_flops()
    return fwd, bwd


def test_attention_flops_against_plain_matmuls():
    """The op's FLOP formulas against FlopCounterMode over plain matmuls of each sample (full square: a
    mask changes no matmul, so causal is half of that, the convention written in ops/_library.py), and
    against a hand-worked number."""
    lengths, Hq, Hkv, D = [3, 0, 5], 4, 2, 16
    T = sum(lengths)
    q = randn(T, Hq, D, dtype=torch.float64, grad=True)
    k, v = randn(T, Hkv, D, dtype=torch.float64, grad=True, seed=1), randn(T, Hkv, D, dtype=torch.float64, grad=True)
    plain_fwd, plain_bwd = _plain_attention_flops(q, k, v, lengths)
    assert plain_fwd == 4 * 16 * 4 * (9 + 25)  # Q K^T and P V: 2 FLOPs x D per score, 4 heads, 9 + 25 scores
    for causal in (True, False):
        with FlopCounterMode(display=False) as counter:
            varlen_attention(q, k, v, cu_of(lengths), 5, causal=causal, backend="torch").sum().backward()
        counts = counter.get_flop_counts()["Global"]
        share = 2 if causal else 1
        assert counts[fl.varlen_attention] * share == plain_fwd
        assert counts[fl.varlen_attention_backward] * share == plain_bwd


def test_flop_formulas():

    N, Din, Dh = 6, 8, 12
    x, w1, b1 = randn(N, Din, dtype=torch.float64), randn(Dh, Din, dtype=torch.float64, grad=True), \
        randn(Dh, dtype=torch.float64, grad=True)
    w2, b2 = randn(Dh, Dh, dtype=torch.float64, grad=True), randn(Dh, dtype=torch.float64, grad=True)
    with FlopCounterMode(display=False) as counter:
        fused_mlp_projector(x, w1, b1, w2, b2, backend="torch").sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[fl.fused_mlp_projector] == 2 * N * Din * Dh + 2 * N * Dh * Dh
    assert counts[fl.fused_mlp_projector_backward] == 2 * N * Dh * Dh * 2 + 2 * N * Din * Dh  # da, dW2, dW1

    hidden, weight = randn(8, 8, grad=True), randn(30, 8, grad=True, seed=1)
    labels = torch.arange(8, device=DEV)
    for backend, forward_gemms in (("torch", 1), ("triton", 3)):  # Triton's gradient GEMMs run in its forward
        with FlopCounterMode(display=False) as counter:
            fused_linear_cross_entropy(hidden.to(TRITON_DTYPE if backend == "triton" else torch.float32),
                                       weight.to(TRITON_DTYPE if backend == "triton" else torch.float32), labels,
                                       backend=backend).backward()
        counts = counter.get_flop_counts()["Global"]
        assert counts[fl.fused_linear_cross_entropy] == forward_gemms * 2 * 8 * 8 * 30
        assert counts.get(torch.ops.aten.mm, 0) == (2 * 2 * 8 * 8 * 30 if backend == "torch" else 0)

    q, k = randn(2, 4, 64), randn(3, 10, 2, 64, seed=1)
    with FlopCounterMode(display=False) as counter:
        decode_attention(q, k, k, torch.tensor([0, 2], dtype=torch.int32, device=DEV),
                         torch.tensor([10, 3], dtype=torch.int32, device=DEV), backend="torch")
    assert counter.get_flop_counts()["Global"][fl.decode_attention] == 4 * 13 * 4 * 64


# ----------------------------------------------------------------------------------------------------
# torch.compile


def test_decoder_block_and_ops_compile_without_graph_breaks():
    """A decoder block between merge + projector and the fused loss, torch backends, compiled with
    fullgraph=True (any graph break raises): forward and gradients equal eager's."""
    torch._dynamo.reset()
    cfg = TextConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    block = DecoderLayer(cfg, "torch")
    lengths, img = [7, 0, 12], 39
    cu = torch.tensor([0, 7, 7, 19], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.randint(0, 39, (19,), generator=torch.Generator().manual_seed(1))
    ids[2:5] = img
    ids[10:13] = img
    labels = torch.roll(ids, -1).masked_fill(ids == img, -100)
    embed = torch.randn(40, 64, requires_grad=True)
    feats_in = torch.randn(6, 24)
    proj = [torch.randn(64, 24, requires_grad=True), torch.randn(64, requires_grad=True),
            torch.randn(64, 64, requires_grad=True), torch.randn(64, requires_grad=True)]
    head = torch.randn(40, 64, requires_grad=True)
    params = [embed, *proj, head, *block.parameters()]

    def step(ids, feats_in, position_ids, cu, labels):
        feats = fused_mlp_projector(feats_in, *proj, backend="torch")
        x = merge_visual_tokens(ids, embed, feats, img, backend="torch")
        cos, sin = rotary_cos_sin(cfg, position_ids, cu, x.dtype)
        hidden = block(x, cos, sin, cu, max(lengths))
        return fused_linear_cross_entropy(hidden, head, labels, backend="torch")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        loss = fn(ids, feats_in, position_ids, cu, labels)
        results.append([loss.detach(), *torch.autograd.grad(loss, params)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
