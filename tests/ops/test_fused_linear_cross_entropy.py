"""fused_linear_cross_entropy, Triton path (interpreter on CPU) against float64 torch.

Tolerance rule (tests/ops/tolerance.py): our max error vs the float64 reference <= 2x the error of the torch
reference (fastllava's eager F.linear + F.cross_entropy) in the same dtype, plus a floor of one ulp
of the largest reference value, which only matters when both errors are at rounding level.
Shapes make several chunks (chunk rows follow T*D/V; the floor of 2048 rows is lowered to 8 here so that
small shapes chunk too), a chunk whose labels are all ignored, and a vocabulary that is not a multiple of
the kernel's BLOCK_V. The vocabularies of the newer decoders are in test_new_shapes.py.
"""

import importlib

import pytest
import torch
from tolerance import DEVICE, assert_within_rule

from fastllava.ops import fused_linear_cross_entropy
from fastllava.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_reference

flce_mod = importlib.import_module("fastllava.ops.fused_linear_cross_entropy")
MIN_CHUNK_ROWS = flce_mod._MIN_CHUNK_ROWS  # the real floor, for the tests of the chunk rule itself


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 8 rows at these small shapes: the chunk loop, a fully ignored chunk and a short last chunk
    run in the interpreter (with the real floor of 2048 rows every shape here would be one chunk)."""
    monkeypatch.setattr(flce_mod, "_MIN_CHUNK_ROWS", 8)


def make_inputs(T, D, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 2 / D**0.5).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[8:16] = -100  # the whole second chunk (chunk rows = 8 for these shapes)
    labels[::5] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def run(fn, hidden, weight, labels, hidden_grad=True, weight_grad=True, grad_out=1.0, **kw):
    h = hidden.detach().clone().requires_grad_(hidden_grad)
    w = weight.detach().clone().requires_grad_(weight_grad)
    loss = fn(h, w, labels, **kw)
    (loss * grad_out).backward()
    return loss.detach(), h.grad, w.grad


def triton_flce(h, w, labels, **kw):
    return fused_linear_cross_entropy(h, w, labels, backend="triton", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_and_gradients_match_float64(dtype, reduction):
    hidden, weight, labels = make_inputs(40, 64, 1031, dtype)  # 5 chunks of 8 rows, V = 1024 + 7
    assert flce_mod._chunk_rows(40, 1031, 64) == 8
    ours = run(triton_flce, hidden, weight, labels, reduction=reduction)
    eager = run(fused_linear_cross_entropy_reference, hidden, weight, labels, reduction=reduction)
    ref = run(fused_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, reduction=reduction)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    for what, o, e, r in zip(["loss", "grad hidden", "grad weight"], ours, eager, ref):
        assert o.dtype == e.dtype
        assert_within_rule(o, e, r, what)


def test_large_vocabulary_path_and_odd_sizes():
    """V >= 8192 takes the (ROWS=1, BLOCK_V=4096) configuration (every V on a GPU); T=97 and D=80 are off
    every grid.

    fp16, not fp32: CPU torch.mm switches to a less accurate path for fewer than 64 rows (fp32, K=8197:
    6.3e-8 vs 2.0e-8 max error for the same product, measured here), so an fp32 comparison of our 8-row
    chunk GEMMs against eager's one 97-row GEMM would measure the BLAS, not this op.
    """
    hidden, weight, labels = make_inputs(97, 80, 8197, torch.float16, seed=1)
    ours = run(triton_flce, hidden, weight, labels, grad_out=0.5)
    eager = run(fused_linear_cross_entropy_reference, hidden, weight, labels, grad_out=0.5)
    ref = run(fused_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, grad_out=0.5)
    for what, o, e, r in zip(["loss", "grad hidden", "grad weight"], ours, eager, ref):
        assert_within_rule(o, e, r, what)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_labels_ignored_follows_torch(reduction):
    """sum: 0 and zero gradients. mean: nan (0 / 0, as torch returns) and still zero gradients."""
    hidden, weight, labels = make_inputs(24, 32, 1031, torch.float32)
    labels = torch.full_like(labels, -100)
    loss, dh, dw = run(triton_flce, hidden, weight, labels, reduction=reduction)
    ref_loss, ref_dh, ref_dw = run(fused_linear_cross_entropy_reference, hidden, weight, labels, reduction=reduction)
    if reduction == "sum":
        assert loss.item() == 0.0 == ref_loss.item()
    else:
        assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert (dh == 0).all() and (dw == 0).all() and (ref_dh == 0).all() and (ref_dw == 0).all()


def test_frozen_weight_frozen_hidden_and_no_grad():
    hidden, weight, labels = make_inputs(24, 32, 1031, torch.float32)
    eager = run(fused_linear_cross_entropy_reference, hidden, weight, labels, reduction="mean")
    ref = run(fused_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, reduction="mean")
    _, dh, dw = run(triton_flce, hidden, weight, labels, weight_grad=False, reduction="mean")  # stage 1: LM frozen
    assert dw is None
    assert_within_rule(dh, eager[1], ref[1], "grad hidden, weight frozen")
    _, dh, dw = run(triton_flce, hidden, weight, labels, hidden_grad=False, reduction="mean")
    assert dh is None
    assert_within_rule(dw, eager[2], ref[2], "grad weight, hidden frozen")
    with torch.no_grad():
        loss = triton_flce(hidden, weight, labels, reduction="mean")
    assert_within_rule(loss, eager[0], ref[0], "loss under no_grad")


def test_poisoned_outputs_are_all_written(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")
    hidden, weight, labels = make_inputs(21, 32, 1031, torch.float32)  # last chunk has 5 rows
    loss, dh, dw = run(triton_flce, hidden, weight, labels)
    assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_second_backward_is_refused():
    hidden, weight, labels = make_inputs(16, 32, 1031, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = triton_flce(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bad_inputs_raise_value_errors():
    hidden, weight, labels = make_inputs(16, 32, 1031, torch.float32)
    bad = labels.clone()
    bad[3] = 1031
    with pytest.raises(ValueError, match=r"label 1031 at position 3 is outside \[0, 1031\)"):
        triton_flce(hidden, weight, bad)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        triton_flce(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match=r"labels must be \(T=16,\)"):
        triton_flce(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="same D"):
        triton_flce(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_flce(hidden.half(), weight, labels)


def test_chunk_rule_bounds_the_logits_chunk(monkeypatch):
    monkeypatch.setattr(flce_mod, "_MIN_CHUNK_ROWS", MIN_CHUNK_ROWS)
    assert flce_mod._chunk_rows(16384, 32000, 4096) == 2096  # 8 chunks at the 7B LM-head shape
    for T, V, D in [(16384, 32000, 4096), (16384, 128256, 4096), (8192, 152064, 3584), (97, 1031, 80), (5, 50, 8),
                    (1, 32000, 4096)]:
        c = flce_mod._chunk_rows(T, V, D)
        assert 1 <= c <= T and (c % 8 == 0 or c == T)
        assert c * V <= max(T * D, MIN_CHUNK_ROWS * V), (T, V, D, c)


@pytest.mark.parametrize("T, V, D", [(8192, 152064, 3584), (8192, 151936, 896), (8192, 128256, 4096),
                                     (16384, 151936, 1536)])
def test_large_vocabularies_take_few_passes_over_the_weight_gradient(monkeypatch, T, V, D):
    """Each chunk re-reads and re-writes the (V, D) fp32 weight gradient: at Qwen's and Llama-3's vocabularies
    the chunks must not thin out with V (T D / V alone gives 43 chunks at Qwen2.5-7B's shape, 170 at
    Qwen2.5-0.5B's: hundreds of GB of traffic per pack, see _MIN_CHUNK_ROWS)."""
    monkeypatch.setattr(flce_mod, "_MIN_CHUNK_ROWS", MIN_CHUNK_ROWS)
    chunks = -(-T // flce_mod._chunk_rows(T, V, D))
    assert chunks <= -(-T // 2048), (T, V, D, chunks)


def test_aot_specs_cover_every_config_and_match_kernel_arguments():
    """Every configuration a GPU launch picks is compiled (the launches at the released vocabularies, with
    their divisibility marks, are checked in test_new_shapes.py); the interpreter's small tile is not."""
    specs = flce_mod.aot_specs()
    chosen = {(s.constexprs["ROWS"], s.constexprs["BLOCK_V"], s.num_warps) for s in specs}
    assert chosen == {flce_mod._config(V, on_gpu=True) for V in (1031, 8191, 8192, 32000, 128256)}
    assert flce_mod._config(1031, on_gpu=False) != flce_mod._config(1031, on_gpu=True)
    assert len(specs) == 3 * 2 * len(flce_mod._MARKINGS)  # dtypes x COMPUTE_GRAD x markings
    for spec in specs:
        assert list(spec.signature) == spec.fn.arg_names, spec.name
