"""Analytic memory traffic: the bytes a module reads and writes per forward and per backward.

Every module that declares `flops(batch, seq_len)` also declares
`bytes_moved(batch, seq_len, element_size) -> Traffic`, built from the primitives below. The model
is the one of an eager, op-by-op execution (docs/performance.md, "Bytes moved"):

- each operation reads its operands and writes its result once from / to main memory (nothing
  stays in cache between operations), so unfused intermediates (the [L, L] logits and
  probabilities of full attention, a feed-forward's hidden layer) count once written and once
  read by every op that uses them;
- a fused kernel (SDPA's flash / memory-efficient kernels, LSH's C and Triton kernels, compiled
  flex attention) reads its inputs and writes its outputs once; its tiles stay on chip;
- views (head splits, slices) move nothing; layout copies are not counted;
- backward of `y = op(x)`: reads the output gradient and what the op saved, writes the input
  gradients; a matmul's two gradient matmuls each read the output gradient; weight gradients are
  written once (the accumulation into `.grad` is not counted);
- activations and weights are `element_size` bytes each (the cell's dtype); integer indices 8.

Counts are integers, in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_BYTES = 8  # int64 indices (sort permutations, bucket ids)


@dataclass(frozen=True)
class Traffic:
    """Bytes read plus bytes written by one forward and by its backward."""

    forward: int = 0
    backward: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.forward + other.forward, self.backward + other.backward)

    def times(self, count: int) -> Traffic:
        """The traffic of `count` such calls."""
        return Traffic(self.forward * count, self.backward * count)

    @property
    def total(self) -> int:
        """Forward plus backward bytes."""
        return self.forward + self.backward


def total_traffic(parts: list[Traffic]) -> Traffic:
    """The sum of `parts` (Traffic() for none)."""
    out = Traffic()
    for part in parts:
        out = out + part
    return out


def linear(rows: int, d_in: int, d_out: int, element_size: int, *, bias: bool = False, input_grad: bool = True) -> Traffic:
    """y[rows, d_out] = x[rows, d_in] W^T (+ b). Forward reads x, W (and b), writes y. Backward:
    dx = dy W (reads dy, W, writes dx; skipped without `input_grad`), dW = dy^T x (reads dy, x,
    writes dW) and db (reads dy, writes db)."""
    x, w, y = rows * d_in, d_in * d_out, rows * d_out
    b = d_out if bias else 0
    forward = x + w + b + y
    backward = (y + w + x if input_grad else 0) + (y + x + w) + (y + b if bias else 0)
    return Traffic(forward * element_size, backward * element_size)


def matmul(batches: int, m: int, k: int, n: int, element_size: int, *, a_grad: bool = True, b_grad: bool = True) -> Traffic:
    """c[batches, m, n] = a[batches, m, k] @ b[batches, k, n] with both operands activations.
    Backward: da = dc b^T (reads dc, b, writes da) and db = a^T dc (reads a, dc, writes db)."""
    a, b, c = batches * m * k, batches * k * n, batches * m * n
    backward = (c + b + a if a_grad else 0) + (a + c + b if b_grad else 0)
    return Traffic((a + b + c) * element_size, backward * element_size)


def pointwise(numel: int, element_size: int, *, inputs: int = 1, saved: int = 0, grad: bool = True) -> Traffic:
    """An elementwise op of `inputs` tensors of `numel` elements into one: forward reads them and
    writes the result; backward reads the output gradient and `saved` tensors of that size (the
    output for softmax, the input for an activation) and writes one gradient per input."""
    forward = (inputs + 1) * numel
    backward = (1 + saved + inputs) * numel if grad else 0
    return Traffic(forward * element_size, backward * element_size)


def softmax(numel: int, element_size: int) -> Traffic:
    """softmax over the last axis: reads x, writes y; backward reads y and dy, writes dx."""
    return pointwise(numel, element_size, saved=1)


def layer_norm(rows: int, features: int, element_size: int) -> Traffic:
    """LayerNorm of [rows, features] with a weight and bias: reads x, writes y (statistics per
    row are negligible); backward reads dy, x, writes dx and the weight and bias gradients."""
    numel = rows * features
    return Traffic((2 * numel + 2 * features) * element_size, (3 * numel + 4 * features) * element_size)


def embedding(rows: int, features: int, element_size: int) -> Traffic:
    """A table lookup of `rows` indices: reads the indices and the rows, writes them; backward
    reads dy and the indices and adds them into the table's gradient (read and written per row)."""
    numel = rows * features
    return Traffic(2 * numel * element_size + rows * INDEX_BYTES, 3 * numel * element_size + rows * INDEX_BYTES)


def fused_attention(batches: int, seq_len: int, head_dim: int, element_size: int, *, inputs: int = 3) -> Traffic:
    """A fused attention kernel (flash / memory-efficient) over [batches, seq_len, head_dim]
    operands: forward reads the `inputs` operands and writes the output and one float32 logsumexp
    per row; backward reads them, the output and its gradient and the logsumexp, and writes one
    gradient per input."""
    operand = batches * seq_len * head_dim * element_size
    lse = batches * seq_len * 4
    forward = inputs * operand + operand + lse
    backward = (inputs + 2) * operand + lse + inputs * operand
    return Traffic(forward, backward)


def adamw_step(n_params: int, element_size: int) -> int:
    """Bytes of one AdamW step over `n_params` parameters: reads the weight, its gradient and the two
    moments, writes the weight and the moments."""
    return 7 * n_params * element_size
