"""Micro-benchmarks of the core attention functions and residual blocks, forward + backward.

Run: `pytest tests/benchmarks --benchmark-only` (skipped in the normal test run). The timer that
synchronises CUDA and the machine info (GPU, driver, torch) come from conftest.py.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from variants.attention.full import full_attention
from variants.attention.lsh import lsh_attention
from variants.model import ReformerLMConfig, build_layer_stack

HEADS, HEAD_DIM, BUCKET = 4, 64, 64
ROUNDS, WARMUP = 10, 2


def _heads(device: torch.device, seq_len: int, n: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=generator).to(device).requires_grad_() for _ in range(n)]


def _forward_backward(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for tensor in inputs:
            tensor.grad = None
        forward().sum().backward()

    return step


def _run(benchmark, step: Callable[[], None]) -> None:
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def test_full_attention(benchmark, device, seq_len):
    q, k, v = _heads(device, seq_len, 3)
    benchmark.group = f"attention L={seq_len}"
    _run(benchmark, _forward_backward(lambda: full_attention(q, k, v), [q, k, v]))


def test_torch_sdpa(benchmark, device, seq_len):
    q, k, v = _heads(device, seq_len, 3)
    benchmark.group = f"attention L={seq_len}"
    _run(benchmark, _forward_backward(lambda: F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(HEAD_DIM)), [q, k, v]))


@pytest.mark.parametrize("n_hashes", [1, 2, 4, 8])
def test_lsh_attention(benchmark, device, seq_len, n_hashes):
    qk, v = _heads(device, seq_len, 2)
    benchmark.group = f"attention L={seq_len}"
    step = _forward_backward(lambda: lsh_attention(qk, v, n_hashes=n_hashes, bucket_size=BUCKET, seed=0), [qk, v])
    _run(benchmark, step)


@pytest.mark.parametrize("residual", ["standard", "reversible"])
def test_residual_block(benchmark, device, seq_len, residual):
    torch.manual_seed(0)
    config = ReformerLMConfig(
        d_model=HEADS * HEAD_DIM,
        n_heads=HEADS,
        d_ff=4 * HEADS * HEAD_DIM,
        n_layers=2,
        attention="lsh",
        attention_params={"lsh": {"n_hashes": 2, "bucket_size": BUCKET, "seed": 0}},
        residual=residual,
        causal=False,
    )
    stack = build_layer_stack(config).to(device)
    x = torch.randn(1, seq_len, config.d_model, device=device, requires_grad=True)
    benchmark.group = f"block L={seq_len}"

    def step() -> None:
        stack.zero_grad(set_to_none=True)
        x.grad = None
        stack(x).sum().backward()

    _run(benchmark, step)
