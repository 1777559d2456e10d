"""harness.selfcheck.references: relative errors and verdicts against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from harness.selfcheck.references import Tolerance, judge, relative_error


def test_relative_error_and_verdicts_against_hand_computed_values():
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5], dtype=torch.float64)) == pytest.approx(0.2)
    assert relative_error(torch.tensor([0.5]), torch.zeros(1, dtype=torch.float64)) == pytest.approx(0.5)
    tolerance = Tolerance(forward=1e-3, grad=1e-2)
    assert judge({"output": 1e-4, "input": 5e-3}, tolerance).status == "PASS"
    failed = judge({"output/causal": 1e-4, "input": 5e-3, "in_proj.weight": 0.5}, tolerance)
    assert failed.status == "FAIL" and failed.detail.startswith("gradient of in_proj.weight off by 5.00e-01 > tol 0.01")
    assert judge({"output/causal": float("nan"), "input": 0.0}, tolerance).status == "FAIL"
