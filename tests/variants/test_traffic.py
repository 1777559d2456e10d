"""variants/traffic.py and the variants' `bytes_moved`: full attention and the feed-forward against
byte counts listed tensor by tensor by hand (each tensor an op reads or writes, named), and the
rules the other variants follow (fused kernels move less, recomputing backwards move more)."""

from __future__ import annotations

import pytest

import variants
from variants.traffic import Traffic, linear, pointwise, softmax

B, L, D, H, FF = 2, 12, 16, 2, 40
DH = D // H
F32 = 4


def test_full_attention_bytes_match_a_tensor_by_tensor_count() -> None:
    x, w_in, qkv = B * L * D, 3 * D * D, B * L * 3 * D
    q = k = v = out = B * H * L * DH
    scores = B * H * L * L
    merged, w_out, y = B * L * D, D * D, B * L * D
    forward = [
        x, w_in, qkv,  # in_proj: read x and W_in, write q | k | v
        q, k, scores,  # q k^T: read q and k, write the logits
        scores, scores,  # / sqrt(head_dim): read, write
        scores, scores,  # softmax: read, write P
        scores, v, out,  # P v: read P and v, write O
        out, merged,  # head merge: read O, write [B, L, d]
        merged, w_out, y,  # out_proj
    ]  # fmt: skip
    backward = [
        y, w_out, merged, y, merged, w_out,  # out_proj: dy W -> d merged; dy^T merged -> dW_out
        merged, out,  # head merge: d merged -> dO
        out, v, scores, scores, out, v,  # P v: dO v^T -> dP; P^T dO -> dv
        scores, scores, scores,  # softmax: read P and dP, write dlogits
        scores, scores,  # the scale: read, write
        scores, k, q, q, scores, k,  # q k^T: dS k -> dq; q^T dS -> dk
        qkv, w_in, x, qkv, x, w_in,  # in_proj: d qkv W -> dx; d qkv^T x -> dW_in
    ]  # fmt: skip
    module = variants.build("full", d_model=D, n_heads=H)
    assert module.bytes_moved(B, L, F32) == Traffic(sum(forward) * F32, sum(backward) * F32)
    assert module.bytes_moved(B, L, 2) == Traffic(sum(forward) * 2, sum(backward) * 2)  # bf16 / fp16: half


def test_causal_full_attention_adds_one_pass_over_the_logits_each_way() -> None:
    plain = variants.build("full", d_model=D, n_heads=H).bytes_moved(B, L, F32)
    causal = variants.build("full", d_model=D, n_heads=H, causal=True).bytes_moved(B, L, F32)
    scores = B * H * L * L * F32
    assert causal.forward - plain.forward == 2 * scores and causal.backward - plain.backward == 2 * scores


def test_feed_forward_bytes_match_a_tensor_by_tensor_count() -> None:
    rows = B * L
    x, w1, b1, h, a, w2, b2, y = rows * D, FF * D, FF, rows * FF, rows * FF, D * FF, D, rows * D
    forward = [x, w1, b1, h, h, a, a, w2, b2, y]  # fc_in, activation, fc_out
    backward = [
        y, w2, a, y, a, w2, y, b2,  # fc_out: dy W2 -> da; dy^T a -> dW2; dy -> db2
        a, h, h,  # activation: read da and its saved input, write dh
        h, w1, x, h, x, w1, h, b1,  # fc_in: dh W1 -> dx; dh^T x -> dW1; dh -> db1
    ]  # fmt: skip
    module = variants.build("ffn", d_model=D, d_ff=FF)
    assert module.bytes_moved(B, L, F32) == Traffic(sum(forward) * F32, sum(backward) * F32)


def test_a_chunked_feed_forward_reads_its_weights_per_chunk_and_recomputes_in_backward() -> None:
    whole = variants.build("ffn", d_model=D, d_ff=FF).bytes_moved(B, L, F32)
    chunked = variants.build("ffn", d_model=D, d_ff=FF, n_chunks=3).bytes_moved(B, L, F32)
    weights = (FF * D + FF + D * FF + D) * F32  # read once more by each of the 2 more chunks
    assert chunked.forward == whole.forward + 2 * weights
    gradients = (2 * FF * D + 2 * D * FF + FF + D) * F32  # per chunk: W read for dx, dW written, db written
    assert chunked.backward == whole.backward + 2 * gradients + chunked.forward  # plus the recomputed forward


def test_primitives() -> None:
    assert linear(3, 4, 5, 1) == Traffic(3 * 4 + 4 * 5 + 3 * 5, 2 * (3 * 5 + 4 * 5 + 3 * 4))
    assert linear(3, 4, 5, 1, input_grad=False).backward == 3 * 5 + 3 * 4 + 4 * 5
    assert pointwise(10, 2, inputs=2) == Traffic(30 * 2, 30 * 2)
    assert softmax(10, 4) == Traffic(80, 120)
    assert Traffic(1, 2) + Traffic(3, 4) == Traffic(4, 6) and Traffic(1, 2).times(3) == Traffic(3, 6) and Traffic(1, 2).total == 3


@pytest.mark.parametrize("name", ["sdpa", "lsh", "local", "linformer", "linear", "performer"])
def test_every_attention_variant_declares_positive_bytes(name: str) -> None:
    params = {"lsh": {"bucket_size": 4}, "local": {"window": 4}, "linformer": {"k": 4, "max_seq_len": 64}}.get(name, {})
    traffic = variants.build(name, d_model=D, n_heads=H, **params).bytes_moved(B, 16, F32)
    assert traffic.forward > 0 and traffic.backward > traffic.forward / 2


def test_fused_kernels_move_less_than_the_same_attention_op_by_op() -> None:
    long = 256
    full = variants.build("full", d_model=D, n_heads=H).bytes_moved(B, long, F32)
    sdpa = variants.build("sdpa", d_model=D, n_heads=H).bytes_moved(B, long, F32)
    assert sdpa.total < full.total / 4  # no [L, L] tensors
    lsh = variants.build("lsh", d_model=D, n_heads=H, bucket_size=16, n_hashes=2)
    ops = lsh.bytes_moved(B, long, F32)
    lsh.attention_backend = "cpu_kernel"  # what a forward through the C kernel records
    assert lsh.bytes_moved(B, long, F32).total < ops.total


def test_the_reversible_stack_moves_its_forward_again_in_backward() -> None:
    def model(residual: str):
        return variants.build("reformer_lm", d_model=D, n_heads=H, d_ff=FF, n_layers=2, vocab_size=32, residual=residual, attention="full")

    standard = model("standard").stack.bytes_moved(B, L, F32)
    reversible = model("reversible").stack.bytes_moved(B, L, F32)
    assert reversible.backward > standard.backward + 0.9 * standard.forward
    lm = model("standard")
    assert lm.bytes_moved(B, L, F32).forward > standard.forward  # embeddings, head and loss on top
