"""varlen_attention: Triton kernel (interpreter on CPU) against a float64 reference, forward and backward.

Tolerance: the one rule of tests/ops/tolerance.py for every output (o, dq, dk, dv): the kernel's max
error against the float64 reference <= 2x the error of the torch reference (per-sample SDPA) run in the
same dtype on the same inputs, plus one ulp of the largest value. fp16/bf16 need that ulp: like
FlashAttention-2 on a GPU, the kernel rounds P and dS to 16 bits before its tensor-core matmuls while
torch's CPU reference keeps them in fp32. fp32 raises the floor to FP32_FLOOR_ULPS (see there).
Every buffer the launchers allocate is NaN-filled first (FASTLLAVA_POISON_OUTPUTS=1), so unwritten rows fail.
"""

import importlib
import inspect
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tolerance import DEVICE as DEV
from tolerance import assert_within_rule

va = importlib.import_module("fastllava.ops.varlen_attention")
from fastllava.extras import MissingExtra  # noqa: E402
from fastllava.ops import varlen_attention  # noqa: E402

CUDA = torch.cuda.is_available()
# fp32 (interpreter only: on CUDA the kernel takes fp16/bf16): o, dq, dk, dv are sums of up to ~130 fp32
# products whose order differs between the kernel's tiles and torch's SDPA; both errors are ~1e-6 and
# ours exceeded 2x torch's by up to 0.94 ulp of the largest value (dk of a [1, 1, 1, 5] pack, measured
# with Triton 3.9's interpreter), so the one-ulp floor is raised to 8 ulps (~1e-6 x max|ref|). With the
# largest values here (<= 4.6), that keeps every bound below the 1e-5 absolute floor this file used
# before, and far below a missed tile's or wrong mask's error (>= 1e-2 relative).
FP32_FLOOR_ULPS = 8
# The "full precision" dtype of tests that check exactness and shapes: fp32 in the interpreter, fp16
# where the compiled kernels run (fp32 CUDA inputs are refused by backend="triton").
FULL = torch.float16 if CUDA else torch.float32


def floor_ulps(dtype):
    return FP32_FLOOR_ULPS if dtype == torch.float32 else 1


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


def run(fn, dtype, causal, cu, max_seqlen, q, k, v, do, **kw):
    """[o, dq, dk, dv] of fn on q, k, v cast to dtype, in dtype."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, cu, max_seqlen, causal=causal, **kw)
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype)) if o.numel() else (q, k, v)
    return [o.detach()] + [x.detach() for x in grads]


def triton_fn(*args, **kw):
    return varlen_attention(*args, backend="triton", **kw)


def check_against_reference(lengths, Hq, Hkv, D, dtype, causal, seed=0, fn=triton_fn, **kw):
    q, k, v, do = make_inputs(lengths, Hq, Hkv, D, dtype, seed)
    cu, max_len = cu_of(lengths), max(lengths)
    exact = run(va.varlen_attention_reference, torch.float64, causal, cu, max_len, q, k, v, do, **kw)
    torch_same = run(va.varlen_attention_reference, dtype, causal, cu, max_len, q, k, v, do, **kw)
    ours = run(fn, dtype, causal, cu, max_len, q, k, v, do, **kw)
    for name, e, t, o in zip(("o", "dq", "dk", "dv"), exact, torch_same, ours):
        assert_within_rule(o, t, e, name, floor_ulps=floor_ulps(dtype))


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
    if CUDA and dtype == torch.float32:
        pytest.skip("fp32 is an interpreter-only dtype: on CUDA the kernel takes fp16/bf16")
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
    default = va._kernel_config
    monkeypatch.setattr(va, "_kernel_config", lambda kind, D, dtype: {**default(kind, D, dtype), **small[kind]})
    check_against_reference([70, 0, 1, 45], 4, 2, 64, torch.float16, causal)


def test_strided_views_of_fused_qkv():
    """q, k, v as views into one (T, Hq + 2 Hkv, D) projection: token stride differs from Hq * D."""
    lengths, Hq, Hkv, D = [9, 30, 1], 4, 2, 64
    qkv = make_inputs(lengths, Hq + 2 * Hkv, 1, D, FULL, 3)[0].to(FULL)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    assert q.stride(0) == (Hq + 2 * Hkv) * D
    cu = cu_of(lengths)
    ours = varlen_attention(q, k, v, cu, 30, backend="triton")
    torch_same = va.varlen_attention_reference(q, k, v, cu, 30)
    exact = va.varlen_attention_reference(q.double(), k.double(), v.double(), cu, 30)
    assert_within_rule(ours, torch_same, exact, "o", floor_ulps=floor_ulps(FULL))


@pytest.mark.parametrize("lengths", [[], [0, 0], [1], [0, 1, 0]])
def test_empty_and_single_token_packs(lengths):
    q, k, v, do = make_inputs(lengths, 2, 1, 64, FULL, 0)
    cu = cu_of(lengths)
    max_len = max(lengths, default=0)
    ours = run(triton_fn, FULL, True, cu, max_len, q, k, v, do)
    torch_same = run(va.varlen_attention_reference, FULL, True, cu, max_len, q, k, v, do)
    exact = run(va.varlen_attention_reference, torch.float64, True, cu, max_len, q, k, v, do)
    # A lone token's dq and dk are exactly 0 (P (dP - delta) with dP = delta): their rounding is on the
    # scale of the other outputs, so the floor is taken of the largest value among all four.
    largest = max((e.abs().max().item() for e in exact if e.numel()), default=0.0)
    for name, o, t, e in zip(("o", "dq", "dk", "dv"), ours, torch_same, exact):
        assert_within_rule(o, t, e, name, floor_ulps=floor_ulps(FULL), floor_of=largest)  # shapes too
    if sum(lengths):  # a lone token attends only to itself: its output is its value, exactly
        assert torch.equal(ours[0], v.to(FULL).repeat_interleave(2, dim=1))


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
        # both float64: the tolerance rule has no lower-precision torch to compare with, so rounding level
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
    (dict(backend="xformers"), "CUDA tensors only"),
]


@pytest.mark.parametrize("over, message", BAD, ids=[m for _, m in BAD])
def test_argument_errors(over, message):
    if CUDA and ("CUDA tensors" in message or "cu_seqlens" in str(over)):
        pytest.skip("CPU-side checks")
    a = _args(**over)
    with pytest.raises(ValueError, match=message):
        varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"], backend=a["backend"])


LIBRARY_GLUE = {  # each library backend's own code, called as varlen_attention calls it
    "flash_attn": lambda a: va._flash_attn(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"], True, None),
    "xformers": lambda a: va._xformers(a["q"], a["k"], a["v"], a["cu_seqlens"], True, None),
}


@pytest.mark.parametrize("backend, package, command", [
    ("flash_attn", "flash-attn", 'pip install --no-build-isolation "fastllava[flash-attn]"'),
    ("xformers", "xformers", 'pip install "fastllava[xformers]"')])
def test_library_backend_without_its_package_says_how_to_install(monkeypatch, backend, package, command):
    """Reached on CUDA tensors only (the device check comes first); called directly here, with the import
    made to fail whether or not the library is installed."""
    monkeypatch.setitem(sys.modules, backend, None)
    expected = f"varlen_attention(backend='{backend}') needs the {package} package, which is not installed: {command}"
    with pytest.raises(MissingExtra, match=re.escape(expected)):
        LIBRARY_GLUE[backend](_args())


def _stand_in_xformers():
    """Modules with the two xformers names the backend uses, computing what xformers documents (a
    (1, T, H, D) batch, a block-diagonal mask from per-block lengths, causal inside each block for
    BlockDiagonalCausalMask, `scale` default 1/sqrt(D)) with SDPA on a dense mask, and asserting the
    layout xformers requires. xformers has no CPU operators, so this is how its glue is tested here."""

    class BlockDiagonalMask:
        causal = False

        def __init__(self, lens):
            self.lens = lens

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            assert kv_seqlen is None and all(isinstance(n, int) and n > 0 for n in q_seqlen), q_seqlen
            return cls(list(q_seqlen))

    class BlockDiagonalCausalMask(BlockDiagonalMask):
        causal = True

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.dim() == 4 and q.shape[0] == 1 and q.shape == k.shape == v.shape, (q.shape, k.shape)
        assert sum(attn_bias.lens) == q.shape[1]
        sample = torch.repeat_interleave(torch.arange(len(attn_bias.lens)), torch.tensor(attn_bias.lens))
        allowed = sample[:, None] == sample[None, :]
        if attn_bias.causal:
            allowed &= torch.ones_like(allowed).tril()
        o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=allowed.to(q.device),
                                           scale=scale)
        return o.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.BlockDiagonalMask, attn_bias.BlockDiagonalCausalMask = BlockDiagonalMask, BlockDiagonalCausalMask
    return {"xformers": types.ModuleType("xformers"), "xformers.ops": ops,
            "xformers.ops.fmha": types.ModuleType("xformers.ops.fmha"), "xformers.ops.fmha.attn_bias": attn_bias}


@pytest.mark.parametrize("causal", [True, False])
def test_xformers_glue_against_the_reference(monkeypatch, causal):
    """The xformers backend's own code (lengths from cu_seqlens without the empty samples, the causal or
    plain mask, K/V heads repeated for GQA, the scale, the (1, T, H, D) layout), forward and gradients,
    on CPU with a stand-in for xformers; float64 on both sides, so they agree to rounding."""
    for name, module in _stand_in_xformers().items():
        monkeypatch.setitem(sys.modules, name, module)
    lengths = [5, 0, 17, 1, 0]
    q, k, v, do = make_inputs(lengths, 4, 2, 32, torch.float64, seed=5)
    cu = cu_of(lengths)

    def xformers_fn(q, k, v, cu, max_seqlen, causal, softmax_scale):
        return va._xformers(q, k, v, cu, causal, softmax_scale)

    ours = run(xformers_fn, torch.float64, causal, cu, 17, q, k, v, do, softmax_scale=0.3)
    exact = run(va.varlen_attention_reference, torch.float64, causal, cu, 17, q, k, v, do, softmax_scale=0.3)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, exact):
        assert (a - b).abs().max().item() < 1e-12, name
    empty = cu_of([0, 0])
    assert va._xformers(q[:0], k[:0], v[:0], empty, causal, None).shape == (0, 4, 32)


def _stand_in_varlen_attn(with_gqa: bool):
    """torch.nn.attention.varlen.varlen_attn as torch 2.13 documents it (`with_gqa`) or without
    `enable_gqa`, as torch 2.11 most likely has it: one dense block-diagonal mask over the pack, with
    flash-attn's window_size=(left, right) (-1 unbounded; (-1, 0) is causal), the scale default 1/sqrt(D),
    and K/V heads shared by Hq / Hkv query heads only when asked. Its CUDA kernel has no CPU operator,
    so this is how the glue's two GQA branches run on every torch."""

    def attend(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), gqa=False):
        assert cu_seq_k is cu_seq_q and max_q == max_k and q.dim() == 3, (max_q, max_k, q.shape)
        if q.shape[1] != k.shape[1]:
            assert gqa, f"{q.shape[1]} query heads, {k.shape[1]} key/value heads, enable_gqa not set"
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        lens = cu_seq_q.diff().long()
        sample = torch.repeat_interleave(torch.arange(len(lens)), lens)
        local = torch.arange(q.shape[0]) - cu_seq_q[:-1].long().repeat_interleave(lens)
        gap = local[:, None] - local[None, :]  # query position - key position inside a sample
        left, right = window_size
        allowed = (sample[:, None] == sample[None, :]) & ((gap <= left) | (left < 0)) & ((-gap <= right) | (right < 0))
        o = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=allowed, scale=scale)
        return o.transpose(0, 1)

    if with_gqa:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                          gqa=enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)
    return varlen_attn


def test_torch_varlen_stand_in_takes_what_installed_torch_does():
    """The stand-ins' keyword arguments are real ones of the installed varlen_attn (torch >= 2.12 has
    enable_gqa), so the glue below is tested against the interface torch has."""
    from torch.nn.attention.varlen import varlen_attn

    real = inspect.signature(varlen_attn).parameters
    for with_gqa in (True, False):
        stand_in = inspect.signature(_stand_in_varlen_attn(with_gqa)).parameters
        assert set(stand_in) <= set(real), set(stand_in) - set(real)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_gqa", [True, False], ids=["enable_gqa", "torch-2.11-repeat"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])  # 2 K/V heads: repeat order matters
def test_torch_varlen_glue_against_the_reference(monkeypatch, Hq, Hkv, with_gqa, causal):
    """The torch_varlen backend's own code (window_size for causal, the scale, GQA through enable_gqa where
    varlen_attn has it and K/V heads repeated where it does not, as on torch 2.11), forward and gradients,
    on CPU with a stand-in for varlen_attn; float64 on both sides, so they agree to rounding."""
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", _stand_in_varlen_attn(with_gqa))
    lengths = [5, 0, 17, 1, 0]
    q, k, v, do = make_inputs(lengths, Hq, Hkv, 32, torch.float64, seed=7)
    cu = cu_of(lengths)
    ours = run(va._torch_varlen, torch.float64, causal, cu, 17, q, k, v, do, softmax_scale=0.3)
    exact = run(va.varlen_attention_reference, torch.float64, causal, cu, 17, q, k, v, do, softmax_scale=0.3)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, exact):
        assert (a - b).abs().max().item() < 1e-12, name


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llava_shape(dtype):
    torch.manual_seed(0)
    lengths = torch.randint(1, 1500, (6,)).tolist() + [0, 1, 2048]
    check_against_reference(lengths, 32, 8, 128, dtype, causal=True)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, do = make_inputs([700, 1, 1300], 16, 2, 128, torch.bfloat16, 0)
    cu = cu_of([700, 1, 1300])
    a = run(triton_fn, torch.bfloat16, True, cu, 1300, q, k, v, do)
    b = run(triton_fn, torch.bfloat16, True, cu, 1300, q, k, v, do)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_gpu_torch_varlen_backend_agrees():
    q, k, v, _ = make_inputs([300, 17, 513], 8, 2, 128, torch.bfloat16, 0)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cu = cu_of([300, 17, 513])
    ref = va.varlen_attention_reference(q.double(), k.double(), v.double(), cu, 513, softmax_scale=0.1)
    other = varlen_attention(q, k, v, cu, 513, backend="torch_varlen", softmax_scale=0.1)
    ours = varlen_attention(q, k, v, cu, 513, backend="triton", softmax_scale=0.1)
    # the rule with torch's own fused varlen kernel as "torch in the same dtype"
    assert_within_rule(ours, other, ref, "o vs torch_varlen")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_xformers_backend(causal):
    """xformers against the float64 reference, forward and backward, GQA, empty samples, a custom scale."""
    pytest.importorskip("xformers.ops", reason='xformers is not installed (pip install "fastllava[xformers]")')

    def xformers_fn(*args, **kw):
        return varlen_attention(*args, backend="xformers", **kw)

    check_against_reference([300, 0, 17, 513, 1], 8, 2, 128, torch.bfloat16, causal, fn=xformers_fn,
                            softmax_scale=0.1)
