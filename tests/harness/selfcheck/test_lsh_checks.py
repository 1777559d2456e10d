"""harness.lsh_checks.lsh_checks: the drawn inputs hash alike in every dtype, near ties are found, and
the check passes the LSH core and fails one that is wrong off float64."""

from __future__ import annotations

import torch

import variants.attention.lsh as lsh_module
import variants.attention.lsh_hashing as lsh_hashing
from harness.selfcheck import lsh_checks
from harness.selfcheck.lsh_checks import LSH_ROUNDS, LshCase
from harness.selfcheck.references import CHECKED_DTYPES


def test_lsh_inputs_hash_into_the_same_buckets_in_every_dtype():
    case = LshCase(8, causal=True)
    for dtype_name in CHECKED_DTYPES:
        dtype = getattr(torch, dtype_name)
        qk, _, rotations = lsh_checks.lsh_inputs(case, dtype_name)
        wide = lsh_hashing.hash_buckets(qk, 8, case.n_buckets, rotations)
        low = lsh_hashing.hash_buckets(qk.to(dtype), 8, case.n_buckets, rotations.to(dtype))
        assert torch.equal(low, wide), dtype_name


def test_weak_hashes_flags_near_ties_only():
    rotations = torch.eye(2, dtype=torch.float64).view(1, 2, 1, 2)  # one head, one round, buckets of +-x, +-y
    qk = torch.tensor([[1.0, 0.2], [1.0, 0.9999]], dtype=torch.float64).view(1, 1, 2, 2)
    assert lsh_checks.weak_hashes(qk, rotations, margin=1e-3).tolist() == [[[False, True]]]


def test_lsh_checks_pass_and_catch_a_core_that_is_wrong_off_float64(cpu_context, monkeypatch):
    for n_hashes in LSH_ROUNDS:
        outcome = lsh_checks.check_lsh(LshCase(n_hashes, causal=n_hashes % 2 == 0), "float32", cpu_context)
        assert outcome.status == "PASS" and max(outcome.data["errors"].values()) < 1e-5, outcome.detail
    original = lsh_module.lsh_attention

    def ignores_causal_off_float64(qk, v, **options):
        if qk.dtype != torch.float64:
            options["causal"] = False
        return original(qk, v, **options)

    monkeypatch.setattr(lsh_module, "lsh_attention", ignores_causal_off_float64)
    broken = lsh_checks.check_lsh(LshCase(4, causal=True), "float32", cpu_context)
    assert broken.status == "FAIL" and broken.detail.startswith("output off by")
