"""The workload's step FLOPs against torch's FLOP counter over a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.workloads import step_flops


@pytest.mark.parametrize(
    "name, options",
    [
        ("lsh", dict(n_hashes=3, bucket_size=4, seed=0)),  # the hashing matmul has no backward
        ("full", dict()),
    ],
)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_step_flops_match_the_flop_counter(name, options, mode):
    # float64 runs LSH's PyTorch-ops path, whose matmuls (forward and hand-written backward) the
    # counter sees; the fused float32 CPU kernel's it cannot
    module = variants.build(name, d_model=16, n_heads=2, **options).double()
    x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        if mode != "forward":
            out.sum().backward()
    assert step_flops(module, 2, 32, mode) == counter.get_total_flops()
    if name == "lsh" and mode != "forward":  # three times the forward, less the hashing's missing backward
        assert step_flops(module, 2, 32, mode) == 3 * module.flops(2, 32) - 2 * module.no_backward_flops(2, 32) < 3 * module.flops(2, 32)
