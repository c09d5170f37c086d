"""decode_attention: the Triton kernel (interpreter on CPU) and the torch path against a float64 reference.

The reference runs scaled_dot_product_attention one row at a time on that row's slice of the cache
(KV heads repeated for their query heads), in float64 for the truth and in the test dtype for "PyTorch's
own error". Tolerance: the rule of tests/ops/tolerance.py, unchanged (ours <= 2x torch's error + 1 ulp
of the largest value) in fp32 and fp16. Measured with Triton 3.9's interpreter on the cases below and
two more seeds each, ours stayed under 2x torch's even without the floor (closest: 0.09 ulp under in
fp32, 0.08 ulp in fp16); a kernel without the tail mask, skipping the tail block, dividing by a wrong
sum or mapping query heads to the wrong KV head fails them (each mutation tried).
Every cache position at or past a row's length, and every slot no row uses, holds NaN: a kernel that
reads one of them turns its output NaN. Output buffers are NaN-filled first (FASTLLAVA_POISON_OUTPUTS=1),
so unwritten elements fail too.
"""

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tolerance import DEVICE as DEV
from tolerance import assert_within_rule

da = importlib.import_module("fastllava.ops.decode_attention")
from fastllava.extras import MissingExtra  # noqa: E402
from fastllava.ops import decode_attention  # noqa: E402

CUDA = torch.cuda.is_available()
# The dtype of tests that check exactness and layouts: fp32 in the interpreter, fp16 where the compiled
# kernel runs (fp32 CUDA inputs are refused by backend="triton").
FULL = torch.float16 if CUDA else torch.float32
AWKWARD = [1, 17, 97, 300]  # a lone token, part of one block, several blocks + a tail, a long row


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")


def make_case(lengths, Hq, Hkv, D, *, S=None, L=None, seed=0, device=DEV):
    """q (B, Hq, D), k_cache and v_cache (S, L, Hkv, D) in float64 holding values exact in fp16 (so every
    test dtype sees the same numbers), NaN at every position a row must not read; slots a random
    permutation of S slots (some unused), lengths as given."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    S = S if S is not None else B + 2
    L = L if L is not None else max(lengths) + 1  # 301 for AWKWARD: not a multiple of any block
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64).half().double()
    k, v = (torch.randn(S, L, Hkv, D, generator=g, dtype=torch.float64).half().double() for _ in range(2))
    slots = torch.randperm(S, generator=g)[:B]
    valid = torch.zeros(S, L, dtype=torch.bool)
    for s, n in zip(slots.tolist(), lengths):
        valid[s, :n] = True
    k[~valid], v[~valid] = float("nan"), float("nan")
    i32 = dict(dtype=torch.int32, device=device)
    return q.to(device), k.to(device), v.to(device), slots.to(**i32), torch.tensor(lengths, **i32)


def reference(q, k_cache, v_cache, slots, lengths, scale=None):
    """Row by row: SDPA of the row's query heads over its valid cache positions, in q's dtype."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b, (s, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        k_HND = k_cache[s, :n].transpose(0, 1).repeat_interleave(group, dim=0)
        v_HND = v_cache[s, :n].transpose(0, 1).repeat_interleave(group, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], k_HND, v_HND, scale=scale)[:, 0]
    return out


def check(case, dtype, backend, **kw):
    """The tolerance rule for `backend` in `dtype` on `case` (inputs in float64); returns our output."""
    q, k, v, slots, lengths = case
    exact = reference(q, k, v, slots, lengths, **kw)
    assert torch.isfinite(exact).all()  # the NaN-filled positions are outside every row's range
    args = (q.to(dtype), k.to(dtype), v.to(dtype), slots, lengths)
    ours = decode_attention(*args, backend=backend, **kw)
    assert ours.dtype == dtype
    assert_within_rule(ours, reference(*args, **kw), exact, f"{backend} {dtype}")
    return ours


# Interpreter cases: few and small (each runs B * Hkv programs in Python). GQA 8/2 and MQA 4/1, head
# dims 64, 80 (masked to 128) and 128, fp32 and fp16, a custom scale; a group of 80 heads needs two
# programs of 64 rows per KV head (rows past the group masked).
@pytest.mark.parametrize(
    "dtype, D, Hq, Hkv, scale",
    [
        (torch.float32, 64, 8, 2, None),
        (torch.float32, 80, 4, 1, 0.3),
        (torch.float16, 128, 8, 2, None),
        (torch.float16, 80, 4, 1, None),
    ],
)
def test_triton_matches_float64_reference(dtype, D, Hq, Hkv, scale):
    if CUDA and dtype == torch.float32:
        pytest.skip("fp32 is an interpreter-only dtype: on CUDA the kernel takes fp16/bf16")
    case = make_case(AWKWARD, Hq, Hkv, D, seed=D + Hq)
    ours = check(case, dtype, "triton", scale=scale)
    # A lone token attends only to itself: p = 1 exactly, so its output is its value, exactly.
    q, k, v, slots, lengths = case
    alone = slots[lengths == 1]
    assert torch.equal(ours[lengths == 1], v[alone, 0].to(dtype).repeat_interleave(Hq // Hkv, dim=1))


def test_triton_group_larger_than_one_tile():
    check(make_case([3, 40], 80, 1, 64, seed=1), FULL, "triton")


def test_triton_reads_strided_views():
    """q from a fused projection (batch stride > Hq * D) and k/v caches as halves of one (S, L, 2, Hkv, D)
    buffer (position stride 2 * Hkv * D): the kernel follows the strides it is given."""
    lengths, Hq, Hkv, D = [5, 40], 4, 2, 64
    q, k, v, slots, lens = make_case(lengths, Hq, Hkv, D, seed=2)
    qkv = torch.cat([q, q[:, :2 * Hkv]], dim=1).to(FULL)
    kv = torch.stack([k, v], dim=2).to(FULL)
    qs, ks, vs = qkv[:, :Hq], kv[:, :, 0], kv[:, :, 1]
    assert qs.stride(0) == (Hq + 2 * Hkv) * D and ks.stride(1) == 2 * Hkv * D
    ours = decode_attention(qs, ks, vs, slots, lens, backend="triton")
    assert_within_rule(ours, reference(qs, ks, vs, slots, lens), reference(q, k, v, slots, lens), "strided")


def test_triton_guard_turns_bad_rows_nan():
    """On CUDA the launcher reads no values (no host sync); the kernel's range guard makes a row with an
    out-of-range slot or length NaN instead of reading outside the cache. Called below the CPU checks."""
    q, k, v, slots, lengths = make_case([3, 3, 3, 3, 3, 3], 2, 1, 64, S=6, L=8, seed=3)
    bad_slots = slots.clone()
    bad_slots[1], bad_slots[2] = 6, -1
    bad_lengths = lengths.clone()
    bad_lengths[3], bad_lengths[4] = 0, 9
    args = (q.to(FULL), k.to(FULL), v.to(FULL))
    ours = da._launch(*args, bad_slots, bad_lengths, 64 ** -0.5)
    bad = torch.tensor([False, True, True, True, True, False], device=DEV)
    assert ours[bad].isnan().all()
    good = reference(*args, slots, lengths)
    assert_within_rule(ours[~bad], good[~bad], reference(q, k, v, slots, lengths)[~bad], "good rows")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    q, k, v, slots, lengths = make_case([4], 4, 2, 64)
    out = decode_attention(q[:0].to(FULL), k.to(FULL), v.to(FULL), slots[:0], lengths[:0], backend=backend)
    assert out.shape == (0, 4, 64) and out.dtype == FULL


# The torch path: cheap, so the full grid of head dims and group shapes, float64 and fp32.
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (4, 1), (4, 4)])
def test_torch_backend(D, Hq, Hkv):
    case = make_case(AWKWARD, Hq, Hkv, D, seed=D * Hq + Hkv)
    o64 = decode_attention(*case, backend="torch")  # float64 on both sides: agreement to rounding
    assert (o64 - reference(*case)).abs().max().item() < 1e-12
    check(case, torch.float32, "torch")


def test_torch_backend_is_batch_invariant():
    """A row alone gives bitwise the result it gets inside a batch of 64 rows of other lengths (CPU fp32):
    generation may batch sequences any way without changing what each one decodes."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 301, (64,), generator=g).tolist()
    q, k, v, slots, lens = (x.float() if x.is_floating_point() else x
                            for x in make_case(lengths, 8, 2, 64, S=64, L=301, seed=4, device="cpu"))
    batch = decode_attention(q, k, v, slots, lens, backend="torch")
    for i in (0, 17, 63):
        alone = decode_attention(q[i:i + 1], k, v, slots[i:i + 1], lens[i:i + 1], backend="torch")
        assert torch.equal(alone[0], batch[i]), i


def test_auto_backend_on_cpu_is_torch():
    if CUDA:
        pytest.skip("auto picks Triton on CUDA")
    q, k, v, slots, lengths = (x.float() if x.is_floating_point() else x for x in make_case([5, 7], 2, 2, 64))
    assert torch.equal(decode_attention(q, k, v, slots, lengths),
                       decode_attention(q, k, v, slots, lengths, backend="torch"))


def _args(**over):
    q, k, v, slots, lengths = make_case([3, 5], 4, 2, 64, S=3, L=6, device="cpu")
    args = dict(q=q.to(FULL), k=k.to(FULL), v=v.to(FULL), slots=slots, lengths=lengths, scale=None,
                backend="triton")
    args.update(over)
    return {name: x.to(DEV) if isinstance(x, torch.Tensor) else x for name, x in args.items()}


def z(*shape, dtype=FULL):
    return torch.zeros(shape, dtype=dtype)


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


BAD = [
    (dict(q=z(2, 256)), "q must be a 3-D"),
    (dict(k=z(3, 6, 128)), "k_cache must be a 4-D"),
    (dict(k=z(3, 6, 2, 64, dtype=torch.bfloat16)), "share one dtype"),
    (dict(q=z(2, 4, 64, dtype=torch.float64)), "share one dtype"),
    (dict(v=z(3, 7, 2, 64)), "same shape"),
    (dict(k=z(3, 6, 2, 32), v=z(3, 6, 2, 32)), "head_dim 32 != q's head_dim 64"),
    (dict(k=z(3, 6, 3, 64), v=z(3, 6, 3, 64)), "multiple of key/value heads"),
    (dict(slots=torch.tensor([0, 1])), "slots must be an int32"),
    (dict(lengths=i32(3, 5, 1)), r"lengths must be an int32 tensor of shape \(B=2,\)"),
    (dict(lengths=i32(3, 0)), "row 1 has 0"),
    (dict(lengths=i32(7, 5)), "1 .. L=6 .* row 0 has 7"),
    (dict(slots=i32(0, 3)), "0 .. S-1=2; row 1 has 3"),
    (dict(slots=i32(-1, 0)), "row 0 has -1"),
    (dict(scale=torch.tensor(0.1)), "Python number"),
    (dict(q=z(2, 4, 72), k=z(3, 6, 2, 72), v=z(3, 6, 2, 72)), "head_dim 72"),
    (dict(k=z(3, 6, 64, 2).transpose(2, 3)), "unit stride along head_dim"),
    (dict(backend="xformers"), "unknown backend"),
    (dict(backend="flash_attn"), "CUDA tensors only"),
]
if CUDA:  # the values of slots and lengths are not read on CUDA (see test_triton_guard_turns_bad_rows_nan)
    BAD = [(over, m) for over, m in BAD if "row" not in m and "CUDA" not in m]


@pytest.mark.parametrize("over, message", BAD, ids=[m for _, m in BAD])
def test_argument_errors(over, message):
    a = _args(**over)
    with pytest.raises(ValueError, match=message):
        decode_attention(a["q"], a["k"], a["v"], a["slots"], a["lengths"], scale=a["scale"], backend=a["backend"])


def test_device_mismatch():
    if not CUDA:
        pytest.skip("needs two devices (CPU and CUDA)")
    a = _args()
    with pytest.raises(ValueError, match="on one device"):
        decode_attention(a["q"], a["k"], a["v"], a["slots"].cpu(), a["lengths"])


def test_flash_attn_without_the_package_says_how_to_install(monkeypatch):
    """Reached on CUDA tensors only (the device check comes first); called directly here, with the import
    made to fail whether or not flash-attn is installed."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    a = _args()
    with pytest.raises(MissingExtra, match=r'pip install --no-build-isolation "fastllava\[flash-attn\]"'):
        da._flash_attn(a["q"], a["k"], a["v"], a["slots"], a["lengths"], 0.125)


def _stand_in_flash_attn():
    """A `flash_attn` module whose flash_attn_with_kvcache computes what flash-attn documents for the
    arguments our backend passes (q (batch, seqlen_q, heads, D); caches (batch_cache, seqlen_cache,
    heads_k, D); cache_seqlens and cache_batch_idx int32 (batch,); causal aligned bottom-right), by
    dense masked SDPA, and asserts that layout. flash-attn does not build here."""

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_batch_idx=None,
                                softmax_scale=None, causal=False):
        B, Lq, Hq, D = q.shape
        assert q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[-1] == D
        assert cache_seqlens.dtype == cache_batch_idx.dtype == torch.int32
        assert cache_seqlens.shape == cache_batch_idx.shape == (B,)
        group, L = Hq // k_cache.shape[2], k_cache.shape[1]
        k = k_cache[cache_batch_idx.long()].repeat_interleave(group, dim=2).transpose(1, 2)  # (B, Hq, L, D)
        v = v_cache[cache_batch_idx.long()].repeat_interleave(group, dim=2).transpose(1, 2)
        pos = torch.arange(L)
        in_cache = pos[None, :] < cache_seqlens[:, None].long()  # (B, L)
        seen = in_cache[:, None, :].expand(B, Lq, L)
        if causal:  # query i of Lq sits at position seqlen - Lq + i
            seen = seen & (pos[None, None, :] <= cache_seqlens[:, None, None] - Lq + torch.arange(Lq)[None, :, None])
        # positions past seqlen may hold anything (NaN here); flash-attn never reads them
        k, v = (torch.where(in_cache[:, None, :, None], x, 0) for x in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=seen[:, None], scale=softmax_scale)
        return o.transpose(1, 2)

    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


def test_flash_attn_glue_against_the_reference(monkeypatch):
    """The flash_attn backend's own code (the (B, 1, H, D) query, slots and lengths as cache_batch_idx
    and cache_seqlens, causal, the scale) on CPU with a stand-in; float64 on both sides."""
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in_flash_attn())
    case = make_case(AWKWARD, 8, 2, 64, device="cpu", seed=5)
    ours = da._flash_attn(*case, 0.3)
    assert ours.shape == case[0].shape
    assert (ours - reference(*case, scale=0.3)).abs().max().item() < 1e-12


def test_aot_specs_cover_every_launch_config():
    """The compile check sees exactly what the launcher can pick on a GPU."""
    seen = {(tuple(sorted(s.constexprs.items())), s.num_warps, s.num_stages) for s in da.aot_specs()}
    for spec in da.aot_specs():
        assert spec.fn is da._decode_kernel and list(spec.signature) == spec.fn.arg_names, spec.name
    for D in da.TRITON_HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):
            for group in range(1, 129):
                cfg = dict(da._kernel_config(D, dtype, group))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                const = dict(HEAD_DIM=D, BLOCK_D=1 << (D - 1).bit_length(), UPCAST=False, DOT_PRECISION="tf32", **cfg)
                assert (tuple(sorted(const.items())), warps, stages) in seen, (D, dtype, group)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq, Hkv", [(32, 32), (32, 8), (40, 40)])
def test_gpu_llava_shapes(dtype, Hq, Hkv):
    """LLaVA-7B (32 heads), a GQA variant (32/8) and 13B (40 heads), D=128, against the reference; lengths
    up to 1024 with a lone token and exact multiples of the block (the float64 cache is built on CPU)."""
    lengths = torch.randint(1, 1025, (5,), generator=torch.Generator().manual_seed(0)).tolist() + [1, 64, 1024]
    check(make_case(lengths, Hq, Hkv, 128, L=1027, seed=Hq + Hkv), dtype, "triton")


@pytest.mark.gpu
def test_gpu_triton_is_batch_invariant():
    lengths = torch.randint(1, 1000, (64,), generator=torch.Generator().manual_seed(6)).tolist()
    q, k, v, slots, lens = (x.bfloat16() if x.is_floating_point() else x
                            for x in make_case(lengths, 32, 8, 128, S=64, L=1000, seed=6))
    batch = decode_attention(q, k, v, slots, lens, backend="triton")
    for i in (0, 31, 63):
        alone = decode_attention(q[i:i + 1], k, v, slots[i:i + 1], lens[i:i + 1], backend="triton")
        assert torch.equal(alone[0], batch[i]), i


@pytest.mark.gpu
def test_gpu_flash_attn_backend():
    pytest.importorskip("flash_attn", reason='flash-attn is not installed (pip install --no-build-isolation "fastllava[flash-attn]")')
    case = make_case([700, 1, 1300, 64], 32, 8, 128, S=6, L=1400, seed=7)
    check(case, torch.bfloat16, "flash_attn", scale=0.1)
