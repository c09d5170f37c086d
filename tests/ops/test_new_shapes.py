"""The kernels at the shapes of the newer backbones (issue 24), in Triton's interpreter against float64.

- Fused linear cross-entropy at Qwen2/2.5's vocabularies (151,936 and 152,064 rows) and Llama-3's
  (128,256), none a multiple of the kernel's 4096-column block; a tied LM head (the weight is the
  embedding table, used by merge_visual_tokens and by the loss: both gradients must add up).
- The fused projector from SigLIP-SO400M's 1152-wide features to Qwen2.5-7B's 3584 and to 4096.
- Varlen attention at head_dim 128 with 7:1 (Qwen2.5-7B: 28 query, 4 KV heads) and 4:1 (32:8) GQA, and
  decode attention at 7:1.
- Attention as transformers' Qwen2 and Qwen3 layers compute it, our kernel in the place of theirs: the
  q/k/v bias (Qwen2) and the per-head q/k RMSNorm (Qwen3) are torch ops before the kernel, so the kernel
  must see exactly the post-bias (post-norm), post-RoPE q and k; norm weights and biases are randomised
  so a missed one shows.
- The ahead-of-time compile check covers these launches: each launcher runs on meta tensors at the real
  shapes with its kernels recorded, and every launch must have the aot_spec that compiles exactly it
  (constexprs, warps, stages, and the JIT's specialization of its integers and pointers).

Tolerance: the rule of tests/ops/tolerance.py (ours <= 2x torch's own error in the same dtype + 1 ulp),
with the fp32 attention floor of test_varlen_attention.py where attention sums are compared. Token counts
are small: the interpreter runs every program in Python (about 4 s for a 152K-row loss at T=64).
"""

import copy
import importlib
import inspect

import pytest
import torch
from test_decode_attention import check as check_decode
from test_decode_attention import make_case
from test_fused_linear_cross_entropy import make_inputs as flce_inputs
from test_fused_linear_cross_entropy import run as run_flce
from test_fused_mlp_projector import check_against_float64 as check_projector
from test_varlen_attention import FP32_FLOOR_ULPS, check_against_reference, cu_of
from tolerance import DEVICE, assert_within_rule

from fastllava.ops import fused_linear_cross_entropy, merge_visual_tokens, varlen_attention
from fastllava.ops._aot import TL_DTYPE_NAMES, default_divisible
from fastllava.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_reference
from fastllava.ops.merge_visual_tokens import merge_visual_tokens_reference

flce_mod = importlib.import_module("fastllava.ops.fused_linear_cross_entropy")
proj_mod = importlib.import_module("fastllava.ops.fused_mlp_projector")
merge_mod = importlib.import_module("fastllava.ops.merge_visual_tokens")
va = importlib.import_module("fastllava.ops.varlen_attention")
da = importlib.import_module("fastllava.ops.decode_attention")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")


def skip_fp32_on_cuda(dtype):
    if CUDA and dtype == torch.float32:
        pytest.skip("fp32 is an interpreter-only dtype for the attention kernels")


# ----------------------------------------------------------------------------------------------------
# Fused linear cross-entropy


def triton_flce(h, w, labels, **kw):
    return fused_linear_cross_entropy(h, w, labels, backend="triton", **kw)


@pytest.mark.parametrize("V, dtype, min_chunk", [
    (151936, torch.float32, None),  # Qwen2 / Qwen2.5 tokenizer rows; 37 blocks of 4096 + 384
    (152064, torch.float16, 8),  # Qwen2.5-7B's padded embedding; 4 chunks of 8 rows: the chunk loop at this V
    (128256, torch.float32, None),  # Llama-3.x; 31 blocks + 1280
])
def test_flce_at_large_vocabularies(monkeypatch, V, dtype, min_chunk):
    if min_chunk is not None:
        monkeypatch.setattr(flce_mod, "_MIN_CHUNK_ROWS", min_chunk)
    hidden, weight, labels = flce_inputs(32, 64, V, dtype, seed=V % 97)
    labels[1], labels[2], labels[3] = V - 1, V - 300, 4095  # the tail block's last column, a tail column, a block edge
    ours = run_flce(triton_flce, hidden, weight, labels, reduction="sum")
    eager = run_flce(fused_linear_cross_entropy_reference, hidden, weight, labels, reduction="sum")
    ref = run_flce(fused_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, reduction="sum")
    # The summed loss (~250) in fp32: ours adds the rows' losses in another order than torch's nll_loss, and
    # torch's rounding was often exact (0 error) where ours was 1 ulp of eps * |loss| off (up to 1.04,
    # measured over 4 seeds at V=128256 and 151936), so its floor is 2 ulps; a missed block or row moves
    # the loss by 1e-2 relative or more. The gradients follow the rule as it is.
    for what, o, e, r in zip(["loss", "grad hidden", "grad weight"], ours, eager, ref):
        assert_within_rule(o, e, r, f"{what} V={V}", floor_ulps=2 if what == "loss" else 1)


def test_tied_lm_head_gradients_add_up_at_qwen_vocabulary():
    """The LM head is the embedding table (Qwen2.5's small sizes): the table's gradient is the sum of the
    merge's (rows of the input tokens) and the loss's (every row), through both Triton kernels, against
    float64 torch (embedding lookup + masked_scatter, a mixing layer, F.linear + cross_entropy).
    The image placeholder id lies inside the table, as llava-hf's added token does: its row gets the
    loss's gradient only."""
    V, D, T, image_id = 151936, 64, 64, 151646
    g = torch.Generator().manual_seed(7)
    table = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(DEVICE)
    mix = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).to(DEVICE)
    feats = torch.randn(12, D, generator=g, dtype=torch.float64).to(DEVICE)
    ids = torch.randint(0, V, (T,), generator=g)
    ids[5:17] = image_id
    ids[20:30] = ids[40]  # a long run of one id: the merge's embedding gradient sums it in one program
    labels = torch.cat([ids[1:], torch.tensor([-100])])
    labels[4:17] = -100  # no loss on the image positions, as the LLaVA templates give
    labels[50] = image_id  # the placeholder's row as a target: a gradient from the loss alone
    ids, labels = ids.to(DEVICE), labels.to(DEVICE)

    def loss_and_grads(dtype, merge, loss):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (table, mix, feats)]
        w, m, f = leaves
        hidden = torch.tanh(merge(ids, w, f, image_id) @ m)
        loss(hidden, w, labels).backward()
        return [t.grad for t in leaves]

    def ours_merge(*a):
        return merge_visual_tokens(*a, backend="triton")

    ours = loss_and_grads(torch.float32, ours_merge, triton_flce)
    eager = loss_and_grads(torch.float32, merge_visual_tokens_reference, fused_linear_cross_entropy_reference)
    exact = loss_and_grads(torch.float64, merge_visual_tokens_reference, fused_linear_cross_entropy_reference)
    for what, o, e, r in zip(["grad table", "grad mix", "grad features"], ours, eager, exact):
        assert_within_rule(o, e, r, what)
    # both uses contribute: a row used only as an input, only as a target, and one untouched
    only_target = labels[50].item()
    assert exact[0][ids[0]].abs().max() > 0 and ours[0][only_target].abs().max() > 0
    untouched = next(i for i in range(V) if i not in set(ids.tolist()) | set(labels.tolist()))
    assert ours[0][untouched].abs().max() > 0  # every row gets the softmax's share through the loss


# ----------------------------------------------------------------------------------------------------
# Fused projector at SigLIP's width


@pytest.mark.parametrize("dout, x_grad", [
    (3584, False),  # SigLIP-SO400M -> Qwen2.5-7B, the tower frozen (stage 1)
    (4096, True),  # SigLIP-SO400M -> Llama-3.1-8B / Mistral-7B / Qwen3-8B
])
def test_projector_from_siglip_width(dout, x_grad):
    """1152 is not a power of 2 (but a multiple of BLOCK_K, 64 / 32); 13 tokens: one ragged row tile.
    fp32 in the interpreter (fp16 GEMMs of these widths take ~30 s of CPU there); fp16 on a GPU."""
    check_projector((13, 1152, dout, dout), torch.float16 if CUDA else torch.float32, x_grad, seed=dout)


# ----------------------------------------------------------------------------------------------------
# Attention: GQA 7:1 and 4:1 at head_dim 128


@pytest.mark.parametrize("Hq, Hkv, dtype, lengths", [
    (28, 4, torch.float32, [37, 0, 1, 20]),
    (28, 4, torch.float16, [17, 1, 30]),  # 32:8 runs inside the Qwen3 layer below
])
def test_varlen_attention_gqa_7_to_1_at_head_dim_128(Hq, Hkv, dtype, lengths):
    skip_fp32_on_cuda(dtype)
    check_against_reference(lengths, Hq, Hkv, 128, dtype, causal=True, seed=Hq + Hkv)


def test_decode_attention_gqa_7_to_1():
    check_decode(make_case([1, 17, 97], 28, 4, 128, seed=3), torch.float16, "triton")


# ----------------------------------------------------------------------------------------------------
# Transformers' Qwen2 / Qwen3 attention layers with our kernel in place of theirs


def _fastllava_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                         cu_seqlens, max_seqlen, **_):
    """transformers' attention-function interface over our kernel: (1, H, T, D) q/k/v of a whole pack,
    exactly as the layer made them (bias, norm, RoPE applied) -> (1, T, Hq, D)."""
    assert attention_mask is None and dropout == 0.0
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=scaling, backend="triton")
    return o.unsqueeze(0), None


def _qwen_layer(family):
    """A transformers attention layer with random norm weights and biases, and its rotary embedding."""
    from transformers import AttentionInterface

    AttentionInterface.register("fastllava_test_varlen", _fastllava_attention)
    rope = {"rope_theta": 1e6, "rope_type": "default"}
    if family == "qwen2":  # Qwen2.5-7B's attention: 3584 wide, 28:4 heads of 128, q/k/v bias
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as Layer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary

        cfg = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, rope_parameters=rope)
    else:  # Qwen3-like: head_dim 128 independent of the width (512), 32:8 heads, q/k RMSNorm, no bias
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Layer
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary

        cfg = Qwen3Config(hidden_size=512, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          rope_parameters=rope)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Layer(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:  # ones / zeros by default: randomised
                p.copy_((1.0 if "norm" in name else 0.0) + 0.5 * torch.randn_like(p))
    return layer.to(DEVICE), Rotary(cfg).to(DEVICE)


def _layer_run(layer, rotary, x_TC, dout_TC, lengths, dtype, ours):
    """Output and gradients (input, then every parameter) of the layer on a pack: ours on the whole pack
    through the kernel, else one sample at a time through transformers' SDPA path."""
    layer = copy.deepcopy(layer).to(dtype)
    layer.config = copy.copy(layer.config)
    layer.config._attn_implementation = "fastllava_test_varlen" if ours else "sdpa"
    x = x_TC.to(dtype).requires_grad_()
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)[None]
    cos, sin = rotary(x[None], positions)
    if ours:
        out = layer(x[None], (cos, sin), None, cu_seqlens=cu_of(lengths), max_seqlen=max(lengths))[0][0]
    else:
        bounds = cu_of(lengths).tolist()
        out = torch.cat([layer(x[None, a:b], (cos[:, a:b], sin[:, a:b]), None)[0][0]
                         for a, b in zip(bounds[:-1], bounds[1:])])
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x, *layer.parameters()], dout_TC.to(dtype))
    return out.detach(), dict(zip(["input", *names], grads))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kernel_inside_transformers_qwen_attention(family):
    """Packed through our kernel = transformers' own layer run per sample, output and every gradient (the
    norm weights' and biases' included), against float64 (fp32 in the interpreter, fp16 on a GPU)."""
    dtype, floor = (torch.float16, 1) if CUDA else (torch.float32, FP32_FLOOR_ULPS)
    layer, rotary = _qwen_layer(family)
    lengths = [17, 1, 30]
    g = torch.Generator().manual_seed(1)
    width = layer.config.hidden_size
    x = torch.randn(sum(lengths), width, generator=g, dtype=torch.float64).to(DEVICE)
    dout = torch.randn(sum(lengths), width, generator=g, dtype=torch.float64).to(DEVICE)
    ours = _layer_run(layer, rotary, x, dout, lengths, dtype, ours=True)
    torch_same = _layer_run(layer, rotary, x, dout, lengths, dtype, ours=False)
    exact = _layer_run(layer, rotary, x, dout, lengths, torch.float64, ours=False)
    assert_within_rule(ours[0], torch_same[0], exact[0], f"{family} output", floor_ulps=floor)
    wanted = {"qwen2": ("q_proj.bias", "k_proj.bias", "v_proj.bias"), "qwen3": ("q_norm.weight", "k_norm.weight")}
    assert set(wanted[family]) <= set(ours[1])
    for name, grad in ours[1].items():
        assert_within_rule(grad, torch_same[1][name], exact[1][name], f"{family} grad {name}",
                           floor_ulps=floor)


# ----------------------------------------------------------------------------------------------------
# The ahead-of-time compile check covers the launches these shapes make


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the launch's arguments by name."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({**dict(zip(self.fn.arg_names, args)), **kwargs})
        return launch


def _constexpr_params(fn):
    """Names of the kernel's tl.constexpr parameters (a JITFunction, or the interpreter's wrapper of one)."""
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    return {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def _jit_view(fn, named):
    """What the JIT specializes a launch on (Triton 3.6-3.9): integers equal to 1 become constants, integers
    that are multiples of 16 and pointers 16-byte aligned (allocations are; a view's offset decides) are
    marked divisible by 16, except integers the kernel lists in do_not_specialize; plus the dtypes of
    pointers, the constexprs and the launch options."""
    ones, marked, types, consts = set(), set(), {}, {}
    constexpr = _constexpr_params(fn)
    plain = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
    for name in fn.arg_names:
        value = named[name]
        if name in constexpr:
            consts[name] = value
        elif isinstance(value, torch.Tensor):
            types[name] = "*" + {torch.int64: "i64", torch.int32: "i32", **TL_DTYPE_NAMES}[value.dtype]
            if value.storage_offset() * value.element_size() % 16 == 0:
                marked.add(name)
        elif isinstance(value, int) and name not in plain:  # do_not_specialize: never a constant or marked
            if value == 1:
                ones.add(name)
            elif value % 16 == 0:
                marked.add(name)
    return ones, marked, types, consts, (named.get("num_warps", 4), named.get("num_stages", 3))


def _covering_spec(specs, fn, named):
    """The spec that compiles exactly this launch, or None."""
    ones, marked, types, consts, options = _jit_view(fn, named)
    for spec in specs:
        if spec.fn is not fn or (spec.num_warps, spec.num_stages) != options:
            continue
        if any(spec.signature[n] != t for n, t in types.items()):
            continue
        if any(spec.constexprs.get(n, "missing") != v for n, v in consts.items()):
            continue
        if {n for n, t in spec.signature.items() if t == "constexpr" and n not in _constexpr_params(fn)} != ones:
            continue
        spec_marked = set(spec.divisible_by_16 if spec.divisible_by_16 is not None
                          else default_divisible(spec.signature))
        if spec_marked - set(types) - ones == marked - set(types) and spec_marked & set(types) <= marked:
            return spec
    return None


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _assert_covered(module, kernel_names, run):
    """Run `run()` with the module's kernels recorded; every launch must have its spec in aot_specs()."""
    recorders = {n: _Recorder(getattr(module, n)) for n in kernel_names}
    with pytest.MonkeyPatch.context() as mp:
        for n, r in recorders.items():
            mp.setattr(module, n, r)
        run()
    specs = module.aot_specs()
    seen = 0
    for r in recorders.values():
        for named in r.launches:
            seen += 1
            ones, marked, *_ = _jit_view(r.fn, named)
            assert _covering_spec(specs, r.fn, named) is not None, (
                f"{r.fn.__name__}: no aot_spec compiles the launch with {sorted(marked)} divisible by 16 and "
                f"{sorted(ones)} equal to 1 ({ {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)} })")
    assert seen, "no launch recorded"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, V, D", [(8192, 152064, 3584), (8200, 151936, 896), (8192, 128256, 4096),
                                     (16384, 32000, 4096), (8192, 32064, 3072)])
def test_aot_specs_cover_loss_launches(dtype, T, V, D):
    """Qwen2.5-7B / 0.5B (a ragged last chunk), Llama-3.x, LLaVA-1.5, Phi-3: with and without gradients."""
    for grads in ((True, True), (True, False), (False, False)):
        _assert_covered(flce_mod, ["_ce_loss_grad_kernel"], lambda: flce_mod._loss_and_grads(
            _meta(T, D, dtype=dtype), _meta(V, D, dtype=dtype), _meta(T, dtype=torch.int64), -100, *grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, Din, Dh", [(729 * 3, 1152, 3584), (729 * 16, 1152, 4096), (196 * 5, 768, 896),
                                        (576 * 5, 1024, 4096), (576 * 2, 1024, 5120)])
def test_aot_specs_cover_projector_launches(dtype, N, Din, Dh):
    """SigLIP-SO400M (729 tokens per image) to Qwen2.5-7B and 4096, SigLIP-B/16 (196) to Qwen2.5-0.5B,
    CLIP-336 (576) to LLaMA widths; forward with and without h, backward with and without a."""
    def run():
        for store in (True, False):
            proj_mod._launch_fwd(_meta(N, Din, dtype=dtype), _meta(Dh, Din, dtype=dtype), _meta(Dh, dtype=dtype),
                                 store_pre=store)
            proj_mod._launch_bwd(_meta(N, Dh, dtype=dtype), _meta(Dh, Dh, dtype=dtype), _meta(N, Dh, dtype=dtype),
                                 store_act=store)
    _assert_covered(proj_mod, ["_linear_bias_gelu_fwd_kernel", "_gelu_grad_matmul_kernel"], run)


ATTENTION_KERNELS = ["_varlen_fwd_kernel", "_varlen_bwd_delta_kernel", "_varlen_bwd_dq_kernel",
                     "_varlen_bwd_dkdv_kernel"]


@pytest.mark.parametrize("T", [8191, 8192])
@pytest.mark.parametrize("Hq, Hkv, D", [(28, 4, 128), (32, 8, 128), (14, 2, 64), (32, 32, 128), (32, 32, 96)])
def test_aot_specs_cover_attention_launches(T, Hq, Hkv, D):
    """Qwen2.5-7B (7:1), Llama-3 / Mistral / Qwen3-8B (4:1), Qwen2.5-0.5B (7:1 at D=64), LLaMA-2 / Vicuna
    (MHA) and Phi-3 (MHA at 96), packs of 8191 and 8192 tokens; prefill and one decode step. Failed before
    the kernels kept T, the group and the cache sizes unspecialized (do_not_specialize)."""
    def run():
        cu = _meta(3, dtype=torch.int32)
        q, k, v = _meta(T, Hq, D, dtype=torch.float16), _meta(T, Hkv, D, dtype=torch.float16), \
            _meta(T, Hkv, D, dtype=torch.float16)
        o, lse = va._launch_forward(q, k, v, cu, 4096, True, 0.1)
        va._launch_backward(_meta(T, Hq, D, dtype=torch.float16), q, k, v, o, lse, cu, 4096, True, 0.1)
    _assert_covered(va, ATTENTION_KERNELS, run)
    _assert_covered(da, ["_decode_kernel"], lambda: da._launch(
        _meta(16, Hq, D, dtype=torch.float16), _meta(32, 4096, Hkv, D, dtype=torch.float16),
        _meta(32, 4096, Hkv, D, dtype=torch.float16), _meta(16, dtype=torch.int32), _meta(16, dtype=torch.int32), 0.1))


@pytest.mark.parametrize("T", [8191, 8192])
@pytest.mark.parametrize("V, D, image_id", [(151936, 3584, 151646), (152064, 896, -200), (128256, 4096, 128256),
                                            (32064, 4096, 32000), (1031, 72, 1030)])
def test_aot_specs_cover_merge_launches(T, V, D, image_id):
    """The merge and its backward (features, embedding table) at the decoders' widths and vocabularies; an
    odd width (72, tests) too. Failed before the launches named their stage count and the kernels kept
    T, the placeholder id and V unspecialized."""
    ids = _meta(T, dtype=torch.int64)
    def run():
        merge_mod._triton_forward(ids, _meta(V, D), _meta(576, D), image_id)
        merge_mod._triton_backward(_meta(T, D), ids, 576, V, image_id, True, True)
    _assert_covered(merge_mod, ["_merge_fwd_kernel", "_merge_bwd_feats_kernel", "_embed_grad_kernel"], run)
