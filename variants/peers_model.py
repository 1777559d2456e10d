"""Whole-model peers of our `reformer_lm` (kind `model`), configured from the same ReformerLMConfig fields.

- `hf_reformer_lm`: HuggingFace transformers' `ReformerModelWithLMHead` (causal) or
  `ReformerForMaskedLM` (causal=False: HF's LM head refuses a non-decoder config);
- `reformer_pytorch_lm`: lucidrains' `reformer_pytorch.ReformerLM`.

Both map tokens [batch, seq_len] (int64) -> logits [batch, seq_len, vocab_size] like `ReformerLM`,
score `loss_bpd` with the same bits-per-dim code, and count `flops(batch, seq_len)` analytically (2 per
multiply-add) plus `no_backward_flops` (LSH's hashing matmul), so the harness's `model` workload runs
all three the same way. A suite's `model:` block configures all three identically; each class
docstring gives the exact mapping, and `extra_parameters()` is the parameter-count difference to
ours (the formula, asserted exactly in tests/variants/test_peers_model.py).

What a peer cannot do raises `VariantUnavailable` when it is built (the harness records a `skipped`
row with the reason, rather than an `error`): its optional package missing (`pip install -e .[peers]`),
HF with `residual: standard` (HF's Reformer is always reversible), an attention pattern or parameter
the peer has no counterpart for. Values that no model accepts stay `ValueError`s (`validate`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from variants.attention.full import full_attention_bytes
from variants.attention.lsh import LSHAttentionConfig, lsh_attention_bytes
from variants.attention.peers import hf_auto_num_buckets, require
from variants.model import AxialPositions, ReformerLM, ReformerLMConfig
from variants.registry import VariantUnavailable, make_config, register
from variants.traffic import Traffic, embedding, layer_norm, linear, pointwise, softmax, total_traffic

# Our attention variants that compute full attention; a peer runs them as its own full attention.
FULL_ATTENTION = ("full", "sdpa")
LSH_ATTENTION = "lsh"
HF_MODULE = "transformers.models.reformer.modeling_reformer"
REFORMER_PYTORCH_MODULE = "reformer_pytorch.reformer_pytorch"


# --------------------------------------------------------------------------- shared


def attention_configs(config: ReformerLMConfig) -> dict[str, Any]:
    """Attention name -> its validated config (our dataclass, defaults filled in) for each name in the
    pattern: what a peer reads n_hashes, bucket_size, shared_qk ... from."""
    out = {}
    for name in config.attention_pattern:
        params = {"dropout": config.dropout, **config.attention_params.get(name, {})}
        out[name] = make_config(name, d_model=config.d_model, n_heads=config.n_heads, causal=config.causal, **params)
    return out


def _unsupported_attention(config: ReformerLMConfig, variant: str, allowed: tuple[str, ...]) -> None:
    """VariantUnavailable when the pattern names attention that `variant` has no counterpart for."""
    missing = sorted(set(config.attention_pattern) - set(allowed))
    if missing:
        raise VariantUnavailable(
            f"{variant}: no counterpart for attention {missing} (it runs {', '.join(allowed)}: ours 'lsh' as its LSH "
            f"attention, {' / '.join(FULL_ATTENTION)} as its full attention)"
        )


def _lsh_flops(batch: int, seq_len: int, d_model: int, n_hashes: int, bucket_size: int) -> int:
    """QK and PV dot products of one LSH layer: per round, seq_len x 2 * bucket_size per head."""
    return 2 * 2 * batch * n_hashes * seq_len * 2 * bucket_size * d_model


def _full_flops(batch: int, seq_len: int, d_model: int) -> int:
    """QK^T and PV over all seq_len^2 pairs of one layer (all heads)."""
    return 2 * 2 * batch * seq_len * seq_len * d_model


class _PeerLM(nn.Module):
    """What the peers share with ReformerLM: the config, max_len, the length check and `loss_bpd`."""

    config: ReformerLMConfig

    # The same bits-per-dim loss as ours, by construction (it only calls self(tokens)).
    loss_bpd = ReformerLM.loss_bpd

    @property
    def max_len(self) -> int:
        """Longest sequence the positional embedding covers (as ReformerLM.max_len)."""
        c = self.config
        return c.max_seq_len if c.axial_shape is None else min(c.max_seq_len, math.prod(c.axial_shape))

    def _check_tokens(self, tokens: torch.Tensor) -> int:
        """seq_len of tokens [batch, seq_len]; ValueError past max_len or where the peer cannot run it."""
        seq_len = tokens.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds the positional embedding's {self.max_len}")
        self.config.check_seq_len(seq_len)  # type: ignore[attr-defined]
        return seq_len

    def n_full_layers(self) -> int:
        """How many layers run full attention."""
        return sum(self.config.attention_for_layer(i) in FULL_ATTENTION for i in range(self.config.n_layers))

    def n_lsh_layers(self) -> int:
        """How many layers run LSH attention."""
        return self.config.n_layers - self.n_full_layers()

    def peer_bytes(self, batch: int, seq_len: int, element_size: int, lsh_core: Traffic | None, head_width: int) -> Traffic:
        """Analytic bytes per forward and backward of a peer's `loss_bpd` (variants/traffic.py), as
        ReformerLM's with a reversible stack: per layer two LayerNorms, the attention (LSH layers:
        qk, v and output projections, the head merge and `lsh_core`, or full attention where
        `lsh_core` is None; full layers: four projections and `full_attention_bytes`), the FFN and
        two residual additions, recomputed in backward; then the final LayerNorm over
        `head_width` features, the vocab projection and the loss."""
        c = self.config
        rows, d = batch * seq_len, c.d_model
        heads = batch * c.n_heads
        merge = pointwise(rows * d, element_size)
        full = full_attention_bytes(heads, seq_len, d // c.n_heads, element_size)
        lsh = linear(rows, d, d, element_size).times(3) + merge + (full if lsh_core is None else lsh_core)
        local = linear(rows, d, d, element_size).times(4) + merge + full
        ffn = linear(rows, d, c.d_ff, element_size, bias=True) + pointwise(rows * c.d_ff, element_size, saved=1)
        ffn = ffn + linear(rows, c.d_ff, d, element_size, bias=True)
        per_layer = layer_norm(rows, d, element_size).times(2) + ffn + pointwise(rows * d, element_size, inputs=2).times(2)
        layers = total_traffic([lsh.times(self.n_lsh_layers()), local.times(self.n_full_layers()), per_layer.times(c.n_layers)])
        layers = layers + Traffic(0, layers.forward)  # reversible: every layer recomputed in backward
        inputs = embedding(rows, d, element_size) + pointwise(rows * d, element_size, inputs=2)
        head = layer_norm(rows, head_width, element_size) + linear(rows, head_width, c.vocab_size, element_size, bias=True)
        return inputs + layers + head + softmax(rows * c.vocab_size, 4)


# --------------------------------------------------------------------------- HuggingFace


@dataclass
class HFReformerLMConfig(ReformerLMConfig):
    """ReformerLMConfig's fields, unchanged, for `hf_reformer_lm` (see HFReformerLM for the mapping)."""

    def check_seq_len(self, seq_len: int) -> None:
        """HF's length rules: past one LSH chunk, a multiple of bucket_size (HF refuses to pad in
        training); a multiple of ffn_chunks (HF chunks the FFN by size). With axial positions HF's
        training also needs seq_len == prod(axial_shape) (checked in forward, training only)."""
        lsh = attention_configs(self).get(LSH_ATTENTION)
        if lsh is not None and seq_len > lsh.bucket_size and seq_len % lsh.bucket_size:
            raise ValueError(f"hf_reformer_lm: seq_len={seq_len} is not a multiple of bucket_size={lsh.bucket_size}")
        if self.ffn_chunks > 1 and seq_len % self.ffn_chunks:
            raise ValueError(f"hf_reformer_lm: seq_len={seq_len} is not a multiple of ffn_chunks={self.ffn_chunks} (HF chunks by size)")


def hf_config_kwargs(config: ReformerLMConfig) -> dict[str, Any]:
    """transformers.ReformerConfig keyword arguments equivalent to `config` (see HFReformerLM).

    VariantUnavailable where HF has no counterpart. Needs no transformers (a plain dict).
    """
    name = "hf_reformer_lm"
    if config.residual != "reversible":
        raise VariantUnavailable(f"{name}: residual {config.residual!r} is not available; HF's Reformer is always reversible")
    _unsupported_attention(config, name, (LSH_ATTENTION, *FULL_ATTENTION))
    attention = attention_configs(config)
    for full in FULL_ATTENTION:
        if full in attention and attention[full].shared_qk:
            raise VariantUnavailable(f"{name}: {full} with shared_qk has no HF counterpart (HF's local attention has separate Q and K)")
    kwargs: dict[str, Any] = {}
    lsh: LSHAttentionConfig | None = attention.get(LSH_ATTENTION)
    if lsh is not None:
        if lsh.dup_correction:
            raise VariantUnavailable(f"{name}: lsh dup_correction has no HF counterpart")
        n_buckets = list(lsh.n_buckets) if isinstance(lsh.n_buckets, tuple) else lsh.n_buckets
        kwargs.update(
            num_hashes=lsh.n_hashes,
            lsh_attn_chunk_length=lsh.bucket_size,
            num_buckets=n_buckets,
            hash_seed=lsh.seed,
            lsh_num_chunks_before=1,
            lsh_num_chunks_after=0,
        )
    max_len = config.max_seq_len
    if config.axial_shape is None:
        kwargs.update(axial_pos_embds=False)
    else:
        if len(config.axial_shape) != 2:
            raise VariantUnavailable(f"{name}: HF's axial position embedding takes exactly 2 axes, got axial_shape={config.axial_shape}")
        widths = [t.shape[1] for t in AxialPositions(config.axial_shape, config.d_model).tables]
        max_len = min(max_len, math.prod(config.axial_shape))
        kwargs.update(axial_pos_embds=True, axial_pos_shape=list(config.axial_shape), axial_pos_embds_dim=widths)
    kwargs.update(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_attention_heads=config.n_heads,
        attention_head_size=config.d_model // config.n_heads,
        feed_forward_size=config.d_ff,
        hidden_act=config.activation,
        attn_layers=["lsh" if config.attention_for_layer(i) == LSH_ATTENTION else "local" for i in range(config.n_layers)],
        # Full attention: one local chunk = the whole sequence (set to seq_len in every forward).
        local_attn_chunk_length=max_len,
        local_num_chunks_before=0,
        local_num_chunks_after=0,
        # HF chunks the FFN by chunk size: seq_len // ffn_chunks, set in every forward (0 = unchunked).
        chunk_size_feed_forward=max_len // config.ffn_chunks if config.ffn_chunks > 1 else 0,
        chunk_size_lm_head=0,
        is_decoder=config.causal,
        max_position_embeddings=max_len,
        hidden_dropout_prob=config.dropout,
        lsh_attention_probs_dropout_prob=config.dropout,
        local_attention_probs_dropout_prob=config.dropout,
        layer_norm_eps=1e-5,  # nn.LayerNorm's default, as ours (HF's default is 1e-12)
        tie_word_embeddings=False,
        use_cache=False,
    )
    return kwargs


@register("hf_reformer_lm", config=HFReformerLMConfig, kind="model")
class HFReformerLM(_PeerLM):
    """HuggingFace transformers' ReformerModelWithLMHead (ReformerForMaskedLM when not causal) (peer).

    Mapping (`hf_config_kwargs`): vocab_size -> vocab_size; d_model -> hidden_size; n_heads ->
    num_attention_heads, attention_head_size = d_model // n_heads; d_ff -> feed_forward_size;
    activation -> hidden_act; n_layers and the attention pattern -> attn_layers, one per layer: our
    `lsh` -> "lsh", our `full` / `sdpa` (separate Q/K only) -> "local" with local_attn_chunk_length =
    seq_len and no chunks before/after, i.e. one chunk, full attention; lsh's n_hashes -> num_hashes,
    bucket_size -> lsh_attn_chunk_length, lsh_num_chunks_before/after = 1/0 (a chunk attends to itself
    and the previous one, as ours), n_buckets -> num_buckets (None: HF's automatic choice for each
    sequence length with this model's max_position_embeddings, `hf_auto_num_buckets`; HF itself keeps
    its first choice for every later length), seed -> hash_seed; ffn_chunks -> chunk_size_feed_forward =
    seq_len // ffn_chunks (HF chunks by size; 0 when ffn_chunks = 1); causal -> is_decoder;
    max_seq_len -> max_position_embeddings; axial_shape None -> a learned [max_seq_len, d_model] table
    (axial_pos_embds=False), else axial_pos_shape with axial_pos_embds_dim = our axis widths (2 axes
    only); dropout -> hidden_dropout_prob, lsh/local_attention_probs_dropout_prob (0 in benchmarks);
    layer_norm_eps 1e-5 (as nn.LayerNorm); no weight tying; no cache. residual must be `reversible`.

    Parameter count minus ours with the same config (`extra_parameters`): 2 * d_model (HF's final
    LayerNorm normalises the concatenated streams, 2 * d_model wide) + d_model * vocab_size (its LM
    head reads them: Linear(2 * d_model, vocab)) + vocab_size when `lm_head.bias` is a separate
    parameter (transformers 5 keeps it apart from lm_head.decoder.bias and never uses it; 4.x tied the
    two). Everything else matches: per layer LayerNorm + qk, v, out (LSH) or q, k, v, out (local)
    bias-free d_model x d_model projections, LayerNorm + FFN with biases. Other differences: the
    streams are concatenated rather than averaged before the final norm; HF's attention semantics are
    those documented for `hf_lsh`.
    """

    def __init__(self, config: HFReformerLMConfig):
        super().__init__()
        kwargs = hf_config_kwargs(config)  # VariantUnavailable first, package or not
        reformer = require(HF_MODULE, "transformers", "hf_reformer_lm")
        self.config = config
        self.hf_config = reformer.ReformerConfig(**kwargs)
        model_cls = reformer.ReformerModelWithLMHead if config.causal else reformer.ReformerForMaskedLM
        self.model = model_cls(self.hf_config)
        self._lsh = [m for m in self.model.modules() if isinstance(m, reformer.LSHSelfAttention)]
        self._local = [m for m in self.model.modules() if isinstance(m, reformer.LocalSelfAttention)]
        self._ffn = [m for m in self.model.modules() if isinstance(m, reformer.ChunkReformerFeedForward)]
        self._auto_buckets: dict[int, int | list[int]] = {}

    def num_buckets(self, seq_len: int) -> int | list[int] | None:
        """Buckets per hashing round of the LSH layers at seq_len: n_buckets, else HF's automatic choice
        (int, or two factors); None when seq_len <= bucket_size (HF attends in full) or no LSH layer."""
        if not self._lsh or seq_len <= self.hf_config.lsh_attn_chunk_length:
            return None
        if self.hf_config.num_buckets is not None:
            return self.hf_config.num_buckets
        if seq_len not in self._auto_buckets:
            chunk, positions = self.hf_config.lsh_attn_chunk_length, self.hf_config.max_position_embeddings
            self._auto_buckets[seq_len] = hf_auto_num_buckets(seq_len, chunk, max_position_embeddings=positions)
        return self._auto_buckets[seq_len]

    def _set_lengths(self, seq_len: int) -> None:
        """Point HF's per-length settings at seq_len: local chunk, FFN chunk size, LSH bucket count."""
        c = self.config
        self.hf_config.local_attn_chunk_length = seq_len  # read by ReformerModel's padding rule
        for layer in self._local:
            layer.chunk_length = seq_len
        chunk_size = seq_len // c.ffn_chunks if c.ffn_chunks > 1 else 0
        for ffn in self._ffn:
            ffn.chunk_size_feed_forward = chunk_size
        buckets = self.num_buckets(seq_len)
        if buckets is not None and self.hf_config.num_buckets is None:
            for layer in self._lsh:
                layer.num_buckets = buckets  # HF would otherwise keep its first automatic choice

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [batch, seq_len] long -> logits [batch, seq_len, vocab_size]."""
        seq_len = self._check_tokens(tokens)
        axial = self.config.axial_shape
        if self.training and axial is not None and seq_len != math.prod(axial):
            raise ValueError(f"hf_reformer_lm: HF trains axial positions only at seq_len = prod(axial_shape) = {math.prod(axial)}")
        self._set_lengths(seq_len)
        return self.model(input_ids=tokens, use_cache=False, return_dict=True).logits

    def extra_parameters(self) -> int:
        """Parameters beyond ReformerLM with the same config (see the class docstring for the terms)."""
        c = self.config
        head = self.model.lm_head
        separate_bias = head.bias is not head.decoder.bias
        return 2 * c.d_model + c.d_model * c.vocab_size + (c.vocab_size if separate_bias else 0)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add): per layer its projections (LSH qk, v, out; local
        q, k, v, out), its attention (LSH: hashing + chunks, or full at seq_len <= bucket_size; local:
        all seq_len^2 pairs) and the FFN; then the LM head on the 2 * d_model concatenated streams."""
        c = self.config
        d, rows = c.d_model, batch * seq_len
        if self.num_buckets(seq_len) is None:  # HF attends in full (or there is no LSH layer)
            lsh_core = _full_flops(batch, seq_len, d)
        else:
            lsh_core = _lsh_flops(batch, seq_len, d, self.hf_config.num_hashes, self.hf_config.lsh_attn_chunk_length)
        lsh = self.n_lsh_layers() * (3 * 2 * rows * d * d + lsh_core)
        local = self.n_full_layers() * (4 * 2 * rows * d * d + _full_flops(batch, seq_len, d))
        ffn = c.n_layers * 2 * 2 * rows * d * c.d_ff
        head = 2 * rows * 2 * d * c.vocab_size
        return lsh + local + ffn + head + self.no_backward_flops(batch, seq_len)

    def no_backward_flops(self, batch: int, seq_len: int) -> int:
        """The hashing matmuls of all LSH layers (their argmax passes no gradient): per round
        rotations / 2 columns, rotations = num_buckets or the sum of its factors (HF's rotation size)."""
        buckets = self.num_buckets(seq_len)
        if buckets is None:
            return 0
        rotations = buckets if isinstance(buckets, int) else sum(buckets)
        per_layer = 2 * batch * seq_len * self.config.d_model * self.hf_config.num_hashes * (rotations // 2)
        return self.n_lsh_layers() * per_layer

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`peer_bytes` with HF's LSH core op by op (`lsh_attention_bytes`, its rotations) and the
        LM head on the 2 x d_model concatenated streams."""
        buckets = self.num_buckets(seq_len)
        core = None
        if buckets is not None:
            rotations = (buckets if isinstance(buckets, int) else sum(buckets)) // 2
            h = self.hf_config
            heads = batch * self.config.n_heads
            head_dim = self.config.d_model // self.config.n_heads
            core = lsh_attention_bytes(
                heads, seq_len, head_dim, element_size, n_hashes=h.num_hashes, bucket_size=h.lsh_attn_chunk_length, rotations=rotations
            )
        return self.peer_bytes(batch, seq_len, element_size, core, 2 * self.config.d_model)


# --------------------------------------------------------------------------- lucidrains


@dataclass
class ReformerPytorchLMConfig(ReformerLMConfig):
    """ReformerLMConfig's fields, unchanged, for `reformer_pytorch_lm` (see ReformerPytorchLM)."""

    def check_seq_len(self, seq_len: int) -> None:
        """Past one bucket (full-attention threshold), LSH layers need a multiple of 2 * bucket_size."""
        lsh = attention_configs(self).get(LSH_ATTENTION)
        if lsh is not None and seq_len > lsh.bucket_size and seq_len % (2 * lsh.bucket_size):
            raise ValueError(f"reformer_pytorch_lm: seq_len={seq_len} must be a multiple of 2 * bucket_size={2 * lsh.bucket_size}")


def reformer_pytorch_kwargs(config: ReformerLMConfig) -> dict[str, Any]:
    """reformer_pytorch.ReformerLM keyword arguments equivalent to `config` (see ReformerPytorchLM);
    VariantUnavailable where it has no counterpart. Needs no reformer_pytorch (activations aside)."""
    name = "reformer_pytorch_lm"
    _unsupported_attention(config, name, (LSH_ATTENTION, *FULL_ATTENTION))
    pattern = set(config.attention_pattern)
    if LSH_ATTENTION in pattern and pattern & set(FULL_ATTENTION):
        raise VariantUnavailable(f"{name}: use_full_attn is model-wide; the pattern {config.attention_pattern} mixes lsh and full")
    if config.d_ff % config.d_model:
        raise VariantUnavailable(f"{name}: d_ff={config.d_ff} is not a multiple of d_model={config.d_model} (it takes ff_mult)")
    attention = attention_configs(config)
    lsh: LSHAttentionConfig | None = attention.get(LSH_ATTENTION)
    kwargs: dict[str, Any] = {}
    if lsh is None:
        kwargs.update(use_full_attn=True)
    else:
        if lsh.n_buckets is not None:
            raise VariantUnavailable(f"{name}: n_buckets={lsh.n_buckets} cannot be set; reformer_pytorch uses seq_len // bucket_size")
        if lsh.dup_correction:
            raise VariantUnavailable(f"{name}: lsh dup_correction is not available (ReformerLM does not expose allow_duplicate_attention)")
        kwargs.update(
            bucket_size=lsh.bucket_size,
            n_hashes=lsh.n_hashes,
            full_attn_thres=lsh.bucket_size,  # one bucket or less: full attention, as ours and HF
        )
    if config.axial_shape is None:
        kwargs.update(absolute_position_emb=True)
    else:
        kwargs.update(axial_position_emb=True, axial_position_shape=tuple(config.axial_shape))
    kwargs.update(
        num_tokens=config.vocab_size,
        dim=config.d_model,
        depth=config.n_layers,
        max_seq_len=config.max_seq_len,
        heads=config.n_heads,
        dim_head=config.d_model // config.n_heads,
        ff_mult=config.d_ff // config.d_model,
        ff_chunks=config.ffn_chunks,
        attn_chunks=1,
        causal=config.causal,
        # Reversible above reverse_thres tokens; `standard` never reverses (max_len is the longest input).
        reverse_thres=0 if config.residual == "reversible" else config.max_seq_len,
        lsh_dropout=config.dropout,
        ff_dropout=config.dropout,  # (ReformerLM hands its layers post_attn_dropout=0 whatever it is given)
        layer_dropout=0.0,
        weight_tie=False,
        weight_tie_embedding=False,
        random_rotations_per_head=False,
    )
    return kwargs


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@register("reformer_pytorch_lm", config=ReformerPytorchLMConfig, kind="model")
class ReformerPytorchLM(_PeerLM):
    """lucidrains' reformer_pytorch.ReformerLM (peer).

    Mapping (`reformer_pytorch_kwargs`): vocab_size -> num_tokens; d_model -> dim; n_layers -> depth;
    max_seq_len -> max_seq_len; n_heads -> heads, dim_head = d_model // n_heads; d_ff -> ff_mult =
    d_ff // d_model (must divide); activation -> ff_activation (nn.GELU / nn.ReLU); ffn_chunks ->
    ff_chunks (torch.chunk along the sequence); causal -> causal; attention all `lsh` -> LSH with
    lsh's bucket_size, n_hashes, full_attn_thres = bucket_size (dup_correction unavailable: ReformerLM
    does not pass allow_duplicate_attention on); all `full` / `sdpa` -> use_full_attn (its shared-QK full
    attention; mixed patterns are unavailable: the switch is model-wide); lsh seed -> the forward runs
    from torch.manual_seed(seed) in a forked RNG (n_buckets cannot be set: it uses seq_len //
    bucket_size); residual `reversible` -> reverse_thres=0, `standard` -> reverse_thres=max_seq_len:
    lucidrains' irreversible mode, the same two-stream network with activations kept by autograd (the
    memory of a standard stack, not its arithmetic); axial_shape None -> absolute_position_emb (a
    learned [max_seq_len, d_model] table), else its AxialPositionalEmbedding with axial_dims = our
    axis widths (concatenated like ours; ReformerLM's own default would sum full-width tables);
    dropout -> lsh_dropout, ff_dropout (0 in benchmarks; it has no embedding dropout); weight_tie and weight_tie_embedding off,
    one rotation set shared by all heads. Streams are averaged before the final LayerNorm, as ours.

    Parameter count minus ours with the same config (`extra_parameters`): n_layers * d_model (the bias
    of each layer's output projection `to_out`) - n_full_layers * d_model^2 when our full attention has
    separate Q and K (lucidrains' is shared-QK: toqk + tov, one d_model x d_model fewer; 0 with
    shared_qk). Embeddings, norms, FFNs and the head match.
    """

    def __init__(self, config: ReformerPytorchLMConfig):
        super().__init__()
        kwargs = reformer_pytorch_kwargs(config)
        module = require(REFORMER_PYTORCH_MODULE, "reformer-pytorch", "reformer_pytorch_lm")
        self.config = config
        lsh = attention_configs(config).get(LSH_ATTENTION)
        self.seed: int | None = lsh.seed if lsh is not None else None
        self.model = module.ReformerLM(ff_activation=_ACTIVATIONS[config.activation], **kwargs)
        if config.axial_shape is not None:
            widths = tuple(t.shape[1] for t in AxialPositions(config.axial_shape, config.d_model).tables)
            axial = require("axial_positional_embedding", "reformer-pytorch", "reformer_pytorch_lm")
            self.model.pos_emb = axial.AxialPositionalEmbedding(config.d_model, tuple(config.axial_shape), axial_dims=widths)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [batch, seq_len] long -> logits [batch, seq_len, vocab_size]."""
        self._check_tokens(tokens)
        with _seeded(self.seed, tokens.device):
            return self.model(tokens)

    def extra_parameters(self) -> int:
        """Parameters beyond ReformerLM with the same config (see the class docstring for the terms)."""
        c = self.config
        full = attention_configs(c)
        separate_qk_full = any(name in full and not full[name].shared_qk for name in FULL_ATTENTION)
        return c.n_layers * c.d_model - (self.n_full_layers() * c.d_model**2 if separate_qk_full else 0)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add): per layer toqk, tov, to_out (bias adds not
        counted), attention (LSH: hashing + seq_len x 2 * bucket_size per round; full at seq_len <=
        bucket_size or with use_full_attn) and the FFN; then the vocab projection."""
        c = self.config
        d, rows = c.d_model, batch * seq_len
        lsh = attention_configs(c).get(LSH_ATTENTION)
        if lsh is None or seq_len <= lsh.bucket_size:
            core = _full_flops(batch, seq_len, d)
        else:
            core = _lsh_flops(batch, seq_len, d, lsh.n_hashes, lsh.bucket_size)
        per_layer = 3 * 2 * rows * d * d + core + 2 * 2 * rows * d * c.d_ff
        return c.n_layers * per_layer + 2 * rows * d * c.vocab_size + self.no_backward_flops(batch, seq_len)

    def no_backward_flops(self, batch: int, seq_len: int) -> int:
        """The hashing matmuls of all layers (argmax: no gradient): (seq_len // bucket_size) / 2
        rotations per round, shared by the heads, each head's head_dim features rotated."""
        lsh = attention_configs(self.config).get(LSH_ATTENTION)
        if lsh is None or seq_len <= lsh.bucket_size:
            return 0
        per_layer = 2 * batch * seq_len * self.config.d_model * lsh.n_hashes * ((seq_len // lsh.bucket_size) // 2)
        return self.config.n_layers * per_layer

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`peer_bytes` with lucidrains' LSH core op by op (`lsh_attention_bytes`, (seq_len //
        bucket_size) / 2 rotations per round; full attention at seq_len <= bucket_size)."""
        lsh = attention_configs(self.config).get(LSH_ATTENTION)
        core = None
        if lsh is not None and seq_len > lsh.bucket_size:
            heads = batch * self.config.n_heads
            head_dim = self.config.d_model // self.config.n_heads
            rotations = (seq_len // lsh.bucket_size) // 2
            core = lsh_attention_bytes(
                heads, seq_len, head_dim, element_size, n_hashes=lsh.n_hashes, bucket_size=lsh.bucket_size, rotations=rotations
            )
        return self.peer_bytes(batch, seq_len, element_size, core, self.config.d_model)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside the block the global RNG (CPU, and `device`'s when CUDA) starts from `seed`; restored
    after. None: a no-op (rotations drawn from the global RNG as the package does)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
