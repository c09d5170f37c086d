"""fused_mlp_projector, Triton path (interpreter on CPU) against float64 torch.

Tolerance rule (tests/ops/tolerance.py): our max error vs the float64 reference <= 2x the error of the torch
reference run in the same dtype, plus a floor of one unit in the last place of the largest reference
value, which only matters when both errors are at rounding level (e.g. the bias gradients in fp32).
"""

import importlib

import pytest
import torch
from tolerance import DEVICE, assert_within_rule

from fastllava.ops import fused_mlp_projector
from fastllava.ops._aot import TL_DTYPE_NAMES
from fastllava.ops.fused_mlp_projector import fused_mlp_projector_reference

proj_mod = importlib.import_module("fastllava.ops.fused_mlp_projector")


def make_inputs(n, din, dh, dout, dtype, x_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g, dtype=torch.float64)
    w1 = torch.randn(dh, din, generator=g, dtype=torch.float64) / din**0.5
    b1 = torch.randn(dh, generator=g, dtype=torch.float64) * 0.5
    w2 = torch.randn(dout, dh, generator=g, dtype=torch.float64) / dh**0.5
    b2 = torch.randn(dout, generator=g, dtype=torch.float64) * 0.5
    dy = torch.randn(n, dout, generator=g, dtype=torch.float64)
    params = [t.to(DEVICE, dtype) for t in (x, w1, b1, w2, b2)]
    for i, p in enumerate(params):
        p.requires_grad_(i > 0 or x_grad)
    return params, dy.to(DEVICE, dtype)


def run(fn, params, dy):
    leaves = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [p.grad for p in leaves]


# (N, Din, Dh, Dout): sizes off the block grid; the second has Din and Dout multiples of BLOCK_K
# (EVEN_K main loops), the first does not.
SHAPES = [(97, 80, 160, 72), (130, 64, 96, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_grad", [False, True])
def test_forward_and_gradients_match_float64(dtype, shape, x_grad):
    check_against_float64(shape, dtype, x_grad)


def check_against_float64(shape, dtype, x_grad, seed=0):
    """Output and every gradient of the Triton path on (N, Din, Dh, Dout) under the tolerance rule."""
    params, dy = make_inputs(*shape, dtype, x_grad=x_grad, seed=seed)
    ours_y, ours_g = run(lambda *p: fused_mlp_projector(*p, backend="triton"), params, dy)
    torch_y, torch_g = run(fused_mlp_projector_reference, params, dy)
    ref_y, ref_g = run(fused_mlp_projector_reference, [p.double() for p in params], dy.double())
    assert_within_rule(ours_y, torch_y, ref_y, "output")
    for name, o, t, r in zip(["x", "w1", "b1", "w2", "b2"], ours_g, torch_g, ref_g):
        if name == "x" and not x_grad:
            assert o is None
            continue
        assert o.dtype == dtype and o.shape == r.shape
        assert_within_rule(o, t, r, f"grad {name}")


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: any element a kernel fails to write shows up."""
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")
    params, dy = make_inputs(97, 80, 160, 72, torch.float32, x_grad=True)
    y, grads = run(lambda *p: fused_mlp_projector(*p, backend="triton"), params, dy)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_no_grad_and_frozen_weights():
    params, dy = make_inputs(97, 80, 160, 72, torch.float32)
    params64 = [p.detach().double() for p in params]
    with torch.no_grad():  # forward without storing the pre-activation
        y = fused_mlp_projector(*params, backend="triton")
        assert_within_rule(y, fused_mlp_projector_reference(*params), fused_mlp_projector_reference(*params64),
                           "output under no_grad")
    # only the second layer trains: the first layer's grads stay None and w2's match the reference
    x, w1, b1, w2, b2 = (p.detach() for p in params)
    grads = []
    for fn, dtype in ((lambda *p: fused_mlp_projector(*p, backend="triton"), torch.float32),
                      (fused_mlp_projector_reference, torch.float32), (fused_mlp_projector_reference, torch.float64)):
        w2_leaf = w2.to(dtype, copy=True).requires_grad_()  # a fresh leaf per run
        fn(x.to(dtype), w1.to(dtype), b1.to(dtype), w2_leaf, b2.to(dtype)).backward(dy.to(dtype))
        grads.append(w2_leaf.grad)
    assert_within_rule(*grads, "grad w2, first layer frozen")


def test_leading_dims_are_kept():
    params, _ = make_inputs(2 * 37, 80, 160, 72, torch.float32)
    x = params[0].reshape(2, 37, 80)
    y = fused_mlp_projector(x, *params[1:], backend="triton")
    assert y.shape == (2, 37, 72)
    assert_within_rule(y.reshape(74, 72), fused_mlp_projector_reference(*params),
                       fused_mlp_projector_reference(*(p.detach().double() for p in params)), "output")


def test_bad_inputs_raise_value_errors():
    params, _ = make_inputs(8, 16, 32, 24, torch.float32)
    x, w1, b1, w2, b2 = params
    with pytest.raises(ValueError, match=r"w1 must be \(Dh, Din=16\)"):
        fused_mlp_projector(x, w1.t(), b1, w2, b2, backend="triton")
    with pytest.raises(ValueError, match=r"w2 must be \(Dout, Dh=32\)"):
        fused_mlp_projector(x, w1, b1, w2[:, :5], b2, backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        fused_mlp_projector(x.half(), w1, b1, w2, b2, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        fused_mlp_projector(x, w1, b1, w2, b2, backend="cuda")


def test_aot_specs_cover_every_launch_config_and_match_kernel_arguments():
    specs = proj_mod.aot_specs()
    for spec in specs:
        assert list(spec.signature) == spec.fn.arg_names, spec.name
        assert set(spec.constexprs) <= {n for n, t in spec.signature.items() if t == "constexpr"}, spec.name
    for kernel, table in ((proj_mod._linear_bias_gelu_fwd_kernel, proj_mod._FWD_CONFIGS),
                          (proj_mod._gelu_grad_matmul_kernel, proj_mod._BWD_CONFIGS)):
        for dtype, (bm, bn, bk, gm, warps, stages) in table.items():
            mine = [s for s in specs if s.fn is kernel and s.signature["h_ptr"] == "*" + TL_DTYPE_NAMES[dtype]]
            assert len(mine) == 6  # STORE x (EVEN_K with N, K or M, N, K multiples of 16; not EVEN_K)
            assert all((s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"], s.num_warps,
                        s.num_stages) == (bm, bn, bk, warps, stages) for s in mine)


def test_auto_takes_triton_only_for_compiled_widths():
    """Widths that are not multiples of 16 give a launch the compile check does not cover (it spills):
    auto gives them to torch on CUDA. The released widths (SigLIP 1152, CLIP 1024, decoders) all qualify."""
    assert all(proj_mod._compiled_widths(din, dh, dh) for din, dh in [(1152, 3584), (1152, 4096), (1024, 4096),
                                                                        (768, 896), (1024, 5120)])
    assert not proj_mod._compiled_widths(80, 160, 72)
