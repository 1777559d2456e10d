"""A small benchmark cell for the measurement tests (an attention layer, one shape)."""

from __future__ import annotations

from harness.cells.benchmark import BenchmarkCell

MEASURE = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "max_repeats": 10, "max_time_s": 10.0, "flush_l2": False, "timeout_s": 120}


def tiny_cell(
    variant: str, seq_len: int = 64, d_model: int = 32, mode: str = "forward_backward", device: str = "cpu", **measure
) -> BenchmarkCell:
    """One `attention` cell of `variant` in float32, batch 2, two heads."""
    return BenchmarkCell(
        suite="tiny",
        workload="attention",
        mode=mode,
        device=device,
        dtype="float32",
        seq_len=seq_len,
        batch=2,
        tokens_per_batch=None,
        model={"d_model": d_model, "n_heads": 2, "causal": False},
        variant=variant,
        variant_params={},
        label=variant,
        measure={**MEASURE, **measure},
    )
