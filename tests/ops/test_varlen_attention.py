"""varlen_attention: Triton kernel (interpreter on CPU) against a float64 reference, forward and backward.

Tolerance (the rule of tests/ops/tolerance.py): for every output (o, dq, dk, dv) the kernel's max error against the float64
reference must be <= 2x the error of the torch reference (per-sample SDPA) run in the same dtype on the
same inputs, or a floor where 2x is below what the dtype can resolve:
- fp32: 1e-5. Both errors are ~1e-6 (summation order over <= 130 terms of size <= ~10), so 2x of one
  rounding pattern against another is noise; any real defect (a missed tile, a wrong mask or GQA head)
  gives errors >= 1e-2.
- fp16/bf16: one ulp at the largest magnitude of that output (eps * max|exact|). Like FlashAttention-2
  on a GPU, the kernel rounds P and dS to 16 bits before its tensor-core matmuls; torch's CPU reference
  keeps them in fp32, so its error is pure output rounding (half an ulp) and 2x of it can sit below the
  kernel's unavoidable extra rounding (seen: dq 1.36e-3 against a bound of 1.32e-3 for |dq| ~ 4).
Every buffer the launchers allocate is NaN-filled first (FASTLLAVA_POISON_OUTPUTS=1), so unwritten rows fail.
"""

import importlib

import pytest
import torch

va = importlib.import_module("fastllava.ops.varlen_attention")
from fastllava.ops import varlen_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def floor(dtype, exact):
    return 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * exact.abs().max().item()


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def shuffled(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]


def make_inputs(lengths, Hq, Hkv, D, dtype, seed):
    """q, k, v, do in float64 holding values exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    xs = [torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]
    return [x.to(dtype).to(torch.float64).to(DEV) for x in xs]


def run(fn, dtype, causal, cu, max_seqlen, q, k, v, do):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, cu, max_seqlen, causal=causal)
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype)) if o.numel() else (q, k, v)
    return [o.detach().double()] + [x.double() for x in grads]


def triton_fn(*args, **kw):
    return varlen_attention(*args, backend="triton", **kw)


def check_against_reference(lengths, Hq, Hkv, D, dtype, causal, seed=0):
    q, k, v, do = make_inputs(lengths, Hq, Hkv, D, dtype, seed)
    cu, max_len = cu_of(lengths), max(lengths)
    exact = run(va.varlen_attention_reference, torch.float64, causal, cu, max_len, q, k, v, do)
    torch_same = run(va.varlen_attention_reference, dtype, causal, cu, max_len, q, k, v, do)
    ours = run(triton_fn, dtype, causal, cu, max_len, q, k, v, do)
    for name, e, t, o in zip(("o", "dq", "dk", "dv"), exact, torch_same, ours):
        assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten rows?)"
        ours_err = (o - e).abs().max().item()
        torch_err = (t - e).abs().max().item()
        tol = max(2 * torch_err, floor(dtype, e))
        assert ours_err <= tol, f"{name}: error {ours_err:.3g} > {tol:.3g} (torch {dtype} error {torch_err:.3g})"


# Head dims 64/80 across GQA ratios 1/4/8, both masks, fp32 and fp16; 96/128 and bf16 at tiny T.
@pytest.mark.parametrize(
    "dtype, D, Hq, Hkv, causal",
    [
        (torch.float32, 64, 2, 2, True),
        (torch.float32, 80, 4, 1, False),
        (torch.float16, 80, 4, 1, True),
        (torch.float16, 64, 8, 1, False),
        (torch.float16, 64, 8, 1, True),
    ],
)
def test_matches_float64_reference(dtype, D, Hq, Hkv, causal):
    check_against_reference(shuffled([0, 1, 17, 97, 130], seed=D + Hq), Hq, Hkv, D, dtype, causal, seed=Hq)


@pytest.mark.parametrize(
    "dtype, D, causal",
    [(torch.bfloat16, 128, True), (torch.float16, 96, True), (torch.bfloat16, 80, False)],
)
def test_wide_head_dims_and_bf16(dtype, D, causal):
    check_against_reference([17, 0, 33, 1], 2, 1, D, dtype, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_small_tiles_many_blocks(monkeypatch, causal):
    """Tiles much smaller than the samples: several diagonal tiles per row/column and BLOCK_N > BLOCK_M."""
    small = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dq": dict(BLOCK_M=32, BLOCK_N=16),
             "dkdv": dict(BLOCK_M=16, BLOCK_N=32), "delta": dict(BLOCK_T=16)}
    monkeypatch.setattr(va, "_config_hook", lambda kind, D, dtype: small[kind])
    check_against_reference([70, 0, 1, 45], 4, 2, 64, torch.float16, causal)


def test_strided_views_of_fused_qkv():
    """q, k, v as views into one (T, Hq + 2 Hkv, D) projection: token stride differs from Hq * D."""
    lengths, Hq, Hkv, D = [9, 30, 1], 4, 2, 64
    qkv = make_inputs(lengths, Hq + 2 * Hkv, 1, D, torch.float32, 3)[0].float()
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    cu = cu_of(lengths)
    ours = varlen_attention(q, k, v, cu, 30, backend="triton")
    exact = va.varlen_attention_reference(q.double(), k.double(), v.double(), cu, 30)
    assert (ours.double() - exact).abs().max().item() < 1e-5


@pytest.mark.parametrize("lengths", [[], [0, 0], [1], [0, 1, 0]])
def test_empty_and_single_token_packs(lengths):
    q, k, v, do = make_inputs(lengths, 2, 1, 64, torch.float32, 0)
    cu = cu_of(lengths)
    max_len = max(lengths, default=0)
    ours = run(triton_fn, torch.float32, True, cu, max_len, q, k, v, do)
    exact = run(va.varlen_attention_reference, torch.float64, True, cu, max_len, q, k, v, do)
    for o, e in zip(ours, exact):
        assert o.shape == e.shape
        if o.numel():
            assert (o - e).abs().max().item() < 1e-5
    if sum(lengths):  # a lone token attends only to itself: its output is its value
        assert torch.allclose(ours[0], v.repeat_interleave(2, dim=1), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_torch_backend_pads_into_one_call_exactly(Hq, Hkv, causal):
    """The `torch` backend (one padded SDPA call) against the per-sample reference, both in float64:
    forward and gradients agree to rounding, with empty samples, a lone token and a long sample in the
    pack, so padding never leaks into a real row (a leak gives errors of order 1)."""
    lengths = [17, 0, 33, 1, 0, 60]
    q, k, v, do = make_inputs(lengths, Hq, Hkv, 32, torch.float64, seed=Hq + Hkv)
    cu = cu_of(lengths)
    padded = run(lambda *a, **kw: varlen_attention(*a, backend="torch", **kw), torch.float64, causal, cu, 60, q, k, v, do)
    exact = run(va.varlen_attention_reference, torch.float64, causal, cu, 60, q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), padded, exact):
        assert (a - b).abs().max().item() < 1e-12, name


def test_auto_backend_on_cpu_is_torch():
    if CUDA:
        pytest.skip("auto picks Triton on CUDA")
    q, k, v, _ = make_inputs([5, 7], 2, 2, 64, torch.float32, 0)
    cu = cu_of([5, 7])
    assert torch.equal(varlen_attention(q, k, v, cu, 7), varlen_attention(q, k, v, cu, 7, backend="torch"))


def _args(**over):
    q, k, v, _ = make_inputs([3, 5], 4, 2, 64, torch.float32, 0)
    args = dict(q=q.float(), k=k.float(), v=v.float(), cu_seqlens=cu_of([3, 5]), max_seqlen=5, backend="triton")
    args.update(over)
    return args


BAD = [
    (dict(q=torch.zeros(8, 64)), "3-D tensor"),
    (dict(k=torch.zeros(8, 2, 64, dtype=torch.float16)), "share one dtype"),
    (dict(q=torch.zeros(8, 4, 64, dtype=torch.int32)), "share one dtype"),
    (dict(k=torch.zeros(8, 3, 64)), "same shape"),
    (dict(k=torch.zeros(8, 3, 64), v=torch.zeros(8, 3, 64)), "multiple of key/value heads"),
    (dict(k=torch.zeros(7, 2, 64), v=torch.zeros(7, 2, 64)), r"must be \(T=8"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8])), "int32"),
    (dict(cu_seqlens=torch.tensor([[0, 3, 8]], dtype=torch.int32)), "1-D int32"),
    (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "non-decreasing; sample 1"),
    (dict(max_seqlen=4), "shorter than sample 1 of length 5"),
    (dict(max_seqlen=torch.tensor(5)), "Python int"),
    (dict(q=torch.zeros(8, 4, 72), k=torch.zeros(8, 2, 72), v=torch.zeros(8, 2, 72)), "head_dim 72"),
    (dict(backend="cudnn"), "unknown backend"),
    (dict(backend="torch_varlen"), "CUDA tensors only"),
    (dict(backend="flash_attn"), "CUDA tensors only"),
]


@pytest.mark.parametrize("over, message", BAD, ids=[m for _, m in BAD])
def test_argument_errors(over, message):
    if CUDA and ("CUDA tensors" in message or "cu_seqlens" in str(over)):
        pytest.skip("CPU-side checks")
    a = _args(**over)
    with pytest.raises(ValueError, match=message):
        varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"], backend=a["backend"])


def test_aot_specs_cover_every_launch_config():
    """The compile check sees exactly what the launchers can pick on a GPU."""
    seen = {(s.fn, tuple(sorted(s.constexprs.items(), key=str)), s.num_warps, s.num_stages) for s in va.aot_specs()}
    for D in va.TRITON_HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):  # fp32 on CUDA goes to the reference
            for causal in (True, False):
                for kind, fn in (("fwd", va._varlen_fwd_kernel), ("dq", va._varlen_bwd_dq_kernel),
                                 ("dkdv", va._varlen_bwd_dkdv_kernel)):
                    cfg = dict(va._kernel_config(kind, D, dtype))
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    const = dict(CAUSAL=causal, HEAD_DIM=D, BLOCK_D=1 << (D - 1).bit_length(), UPCAST=False,
                                 DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", **cfg)
                    assert (fn, tuple(sorted(const.items(), key=str)), warps, stages) in seen, (kind, D, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llava_shape(dtype):
    torch.manual_seed(0)
    lengths = torch.randint(1, 1500, (6,)).tolist() + [0, 1, 2048]
    check_against_reference(lengths, 32, 8, 128, dtype, causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_backward_is_deterministic():
    q, k, v, do = make_inputs([700, 1, 1300], 16, 2, 128, torch.bfloat16, 0)
    cu = cu_of([700, 1, 1300])
    a = run(triton_fn, torch.bfloat16, True, cu, 1300, q, k, v, do)
    b = run(triton_fn, torch.bfloat16, True, cu, 1300, q, k, v, do)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_torch_varlen_backend_agrees():
    q, k, v, _ = make_inputs([300, 17, 513], 8, 2, 128, torch.bfloat16, 0)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cu = cu_of([300, 17, 513])
    ref = va.varlen_attention_reference(q.double(), k.double(), v.double(), cu, 513, softmax_scale=0.1)
    try:
        other = varlen_attention(q, k, v, cu, 513, backend="torch_varlen", softmax_scale=0.1)
    except ValueError as e:
        pytest.skip(str(e))
    ours = varlen_attention(q, k, v, cu, 513, backend="triton", softmax_scale=0.1)
    assert (ours.double() - ref).abs().max() <= 2 * (other.double() - ref).abs().max() + 1e-3
