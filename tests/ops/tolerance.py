"""The kernel tolerance rule, the one every test of fastllava.ops uses (STYLE.md item 4).

Our error against a float64 reference is at most twice PyTorch's own error in the same dtype, plus a
floor of one ulp of the largest reference value: the kernels round some intermediates to the input
dtype where the torch reference does not (FlashAttention-2's P and dS before their 16-bit matmuls, a
GEMM output before the fused epilogue), so when torch's error is pure output rounding (half an ulp),
2x of it can sit below our unavoidable extra rounding (seen: attention dq 1.36e-3 against 2x torch's
1.32e-3 for |dq| ~ 4 in fp16). A real defect (a missed tile, a wrong mask, head or label) gives errors
of 1e-2 or more relative to the largest value, far above the floor.
"""

import torch

# CPU: the interpreter (tests/conftest.py); with a GPU the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_rule(ours, torch_same_dtype, ref64, what, *, floor_ulps=1, floor_of=None):
    """Assert max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + floor_ulps * eps * floor_of.

    ours: the op's result in the test dtype (eps is that dtype's machine epsilon); torch_same_dtype: the
    torch reference run in the same dtype on the same inputs; ref64: the reference in float64.

    The floor is `floor_ulps` ulps of `floor_of`, by default 1 ulp of max|ref64|: that is the rule. The
    two parameters exist for the cases where that floor is below what the arithmetic can resolve; a
    caller that changes them says why and what it measured, and keeps the floor far below a defect's
    error:
    - floor_ulps > 1 where both errors are summation-order noise of the same size, so "2x torch's"
      compares one rounding pattern with another: fp32 attention sums a few hundred fp32 products in
      another order than torch's SDPA (both errors ~1e-6; ours exceeded 2x torch's by up to ~1 ulp).
    - floor_of where the exact result cancels to (near) zero and max|ref64| says nothing about the
      rounding: attention's dq and dk of a lone token are exactly 0 = P (dP - delta), two sums of the
      same products computed in different orders, so their rounding is on the scale of the other outputs.
    """
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    ours64 = ours.detach().double()
    assert torch.isfinite(ours64).all() or not torch.isfinite(ref64).all(), \
        f"{what}: non-finite values where float64 has none (unwritten elements?)"
    err = (ours64 - ref64).abs().max().item()
    err_torch = (torch_same_dtype.detach().double() - ref64).abs().max().item()
    magnitude = ref64.abs().max().item() if floor_of is None else float(floor_of)
    floor = floor_ulps * torch.finfo(ours.dtype).eps * magnitude
    assert err <= 2 * err_torch + floor, (f"{what}: error {err:.3g} > 2 x torch's {err_torch:.3g} + floor {floor:.3g} "
                                          f"({floor_ulps} ulp of {magnitude:.3g} in {ours.dtype})")
