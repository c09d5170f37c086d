"""The kernel tolerance rule: our error against a float64 reference is at most twice
PyTorch's own error in the same dtype, plus one ulp of the largest value (the kernels round
intermediates to the input dtype where the torch reference does not)."""

import torch

# CPU: the interpreter (tests/conftest.py); with a GPU the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_rule(ours, torch_same_dtype, ref64, what):
    err = (ours.double() - ref64).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref64).abs().max().item()
    floor = torch.finfo(ours.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * err_torch + floor, f"{what}: error {err:.3g} > 2 x torch's {err_torch:.3g} + floor {floor:.3g}"
