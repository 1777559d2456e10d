"""harness.variant_checks.variant_checks: the reference holds exactly the device's weights and inputs, a
variant without a CPU kernel is checked against its registered ancestor, every kind passes in every
dtype."""

from __future__ import annotations

import torch

import variants
from harness.selfcheck import variant_checks
from harness.selfcheck.references import CHECKED_DTYPES, TOLERANCES


def test_reference_holds_exactly_the_device_weights_and_inputs():
    master = variant_checks.build_small("lsh", causal=True)
    for dtype in (torch.bfloat16, torch.float16):
        device_copy = variant_checks.on_device(master, torch.device("cpu"), dtype)
        reference = variant_checks.rounded_reference(master, dtype)
        for (name, low), (_, wide) in zip(device_copy.named_parameters(), reference.named_parameters()):
            assert low.dtype == dtype and wide.dtype == torch.float64
            assert torch.equal(low.double(), wide), name
            assert not torch.equal(wide, dict(master.named_parameters())[name])  # rounding did happen


def test_a_variant_without_a_cpu_kernel_is_checked_against_its_registered_ancestor():
    assert variant_checks.registered_ancestors("sdpa_efficient")[0][0] == "sdpa"
    master = variant_checks.build_small("sdpa_efficient", causal=True)
    inputs = variant_checks.variant_inputs("attention", master)
    run, used = variant_checks.reference_run("sdpa_efficient", master, inputs, torch.float32)
    sdpa = variants.spec("sdpa").module_cls(master.config).double()
    sdpa.load_state_dict(variant_checks.rounded_reference(master, torch.float32).state_dict())
    expected = variant_checks.forward_backward(sdpa, variant_checks.widened(inputs, torch.float32))
    assert used == "sdpa" and torch.equal(run["output"], expected["output"])


def test_variant_checks_pass_for_every_kind_in_every_dtype(cpu_context):
    for name in ("full", "lsh", "ffn", "standard", "reversible", "reformer_lm"):
        for dtype in CHECKED_DTYPES:
            outcome = variant_checks.check_variant(name, dtype, cpu_context)
            assert outcome.status == "PASS", (name, dtype, outcome.detail)
            assert max(outcome.data["errors"].values()) <= TOLERANCES[dtype].grad
