"""Comparing a device run with its float64 CPU reference: the relative error of every tensor
(`tensor_errors`), the verdict against the tolerance of the dtype (`judge`), and the dtypes the
numerics checks run in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.selfcheck.framework import Outcome

CHECKED_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes every numerics check runs in, by suite name
BASE_SEED = 0  # every input, weight and probe the numerics checks draw is seeded from it


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error, as max |device - reference| / max |reference| of each tensor."""

    forward: float
    grad: float


# float32 leaves room for other kernels' summation orders (cuBLAS, SDPA) and catches a wrong formula;
# the low-precision bounds allow the rounding that builds up over a layer stack (worst on this CPU: the
# LM's first LayerNorm weight gradient, 0.13 in bfloat16 and 0.024 in float16) and catch a wrong or
# overflowing low-precision path.
TOLERANCES = {
    "float32": Tolerance(forward=1e-4, grad=1e-3),
    "bfloat16": Tolerance(forward=5e-2, grad=2.5e-1),
    "float16": Tolerance(forward=1e-2, grad=6e-2),
}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| in float64 (the absolute error when the reference is 0)."""
    actual, reference = actual.detach().double().cpu(), reference.detach().double()
    scale = reference.abs().max().item() if reference.numel() else 0.0
    error = (actual - reference).abs().max().item() if reference.numel() else 0.0
    return error / scale if scale > 0 else error


def widened(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` rounded to `dtype` and back to float64: the exact values the device run starts from."""
    return tensor.to(dtype).to(torch.float64)


def tensor_errors(device_run: dict[str, torch.Tensor], reference_run: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every tensor of a run against the reference run (None gradients count as 0)."""
    errors = {}
    for key, reference in reference_run.items():
        actual = device_run.get(key)
        if reference is None and actual is None:
            continue
        if reference is None:
            reference = torch.zeros_like(actual, dtype=torch.float64)
        if actual is None:
            actual = torch.zeros_like(reference)
        errors[key] = relative_error(actual, reference)
    return errors


def judge(errors: dict[str, float], tolerance: Tolerance) -> Outcome:
    """PASS when the output is within `tolerance.forward` and every gradient within `tolerance.grad`."""
    outputs = {k: v for k, v in errors.items() if is_output(k)}
    grads = {k: v for k, v in errors.items() if not is_output(k)}
    worst_output = max(outputs, key=lambda k: nan_last(outputs[k]), default=None)
    worst_grad = max(grads, key=lambda k: nan_last(grads[k]), default=None)
    fwd = outputs[worst_output] if worst_output else 0.0
    grad = grads[worst_grad] if worst_grad else 0.0
    data = {
        "errors": {k: v if math.isfinite(v) else str(v) for k, v in errors.items()},  # JSON has no NaN
        "tolerance": {"forward": tolerance.forward, "grad": tolerance.grad},
    }
    summary = f"fwd {fwd:.1e} grad {grad:.1e} (tol {tolerance.forward:.2g}/{tolerance.grad:.2g})"
    if not fwd <= tolerance.forward:  # also catches NaN
        return Outcome("FAIL", f"{worst_output} off by {fwd:.2e} > tol {tolerance.forward:.2g}; {summary}", data)
    if not grad <= tolerance.grad:
        return Outcome("FAIL", f"gradient of {worst_grad} off by {grad:.2e} > tol {tolerance.grad:.2g}; {summary}", data)
    return Outcome("PASS", summary, data)


def is_output(key: str) -> bool:
    """Whether an error key names the forward output ("output", "output/causal") rather than a gradient."""
    return key.split("/")[0] == "output"


def nan_last(value: float) -> float:
    """Sort key putting NaN above every number, so the worst error found is a NaN when there is one."""
    return math.inf if math.isnan(value) else value
