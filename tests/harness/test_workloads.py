"""The workload's step FLOPs against torch's FLOP counter over a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.workloads import build_workload, step_flops, tensor_mib


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


# --------------------------------------------------------------------------- memory breakdown


def _cell(tmp_path, mode: str, seq_len: int = 64, **measure):
    from harness.suites import load_suite
    from tests.harness.test_runner import write_suite

    return load_suite(write_suite(tmp_path, f"mem_{mode}", [{"name": "full"}], [seq_len], mode=mode, **measure)).cells()[0]


def test_tensor_mib_counts_a_storage_once():
    weight = torch.zeros(256, 1024)  # 1 MiB of float32
    assert tensor_mib([weight, weight.view(-1), weight[0], weight.t()]) == 1.0
    assert tensor_mib([weight, torch.zeros(512, dtype=torch.float64)]) == 1.0 + 4096 / 2**20


@pytest.mark.parametrize("mode", ["forward", "forward_backward", "train_step"])
def test_state_memory_is_the_sizes_computed_by_hand(tmp_path, mode):
    # A full-attention layer with d_model 32 (write_suite's model): in_proj [96, 32] and out_proj
    # [32, 32], no biases: 4 x 32 x 32 float32 = 16 KiB; AdamW keeps two moments of each and a
    # float32 step count per parameter tensor.
    workload = build_workload(_cell(tmp_path, mode), torch.device("cpu"))
    workload.step()
    params = 4 * 32 * 32 * 4
    expected = {
        "param_mem_mib": params / 2**20,
        "grad_mem_mib": (params if mode != "forward" else 0) / 2**20,
        "optim_mem_mib": (2 * params + 2 * 4 if mode == "train_step" else 0) / 2**20,
    }
    assert workload.state_memory_mib() == pytest.approx(expected, rel=0, abs=1e-12)


def test_gradients_and_optimizer_state_persist_between_steps(tmp_path):
    workload = build_workload(_cell(tmp_path, "train_step"), torch.device("cpu"))
    grads = [p.grad for p in workload.module.parameters()]
    state = [id(v) for s in workload.optimizer.state.values() for v in s.values()]
    assert all(g is not None for g in grads) and len(state) == 3 * len(grads)  # before the first step
    for _ in range(2):
        workload.step()
    assert [p.grad for p in workload.module.parameters()] == grads  # the same tensors, zeroed in place
    assert [id(v) for s in workload.optimizer.state.values() for v in s.values()] == state
    assert all(g.abs().sum() > 0 for g in grads)


def test_activation_memory_holds_the_attention_probabilities(tmp_path):
    # forward + backward of full attention at L = 1024 keeps the [1, 2, 1024, 1024] float32
    # probabilities (8 MiB) for the backward: the activation peak is at least that, and the state
    # (16 KiB of weights) is not part of it.
    from harness.cells.benchmark import measure_cell

    row = measure_cell(_cell(tmp_path, "forward_backward", seq_len=1024), limit_memory=False)
    assert row["status"] == "ok", row
    assert row["activation_mem_mib"] == row["peak_mem_mib"] >= 2 * 1024 * 1024 * 4 / 2**20
    assert row["param_mem_mib"] == row["grad_mem_mib"] == 4 * 32 * 32 * 4 / 2**20 and row["optim_mem_mib"] == 0
