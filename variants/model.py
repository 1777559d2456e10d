"""Reformer language model (variant `reformer_lm`, kind `model`) and its bits-per-dim loss.

tokens -> token embedding + positional embedding (learned or axial) -> residual stack of
(PreNorm(attention), PreNorm(feed-forward)) layers -> LayerNorm -> projection to vocab logits.
The attention variant of each layer, the feed-forward and the residual stack all come from the
registry by name, so any registered variant can be swapped in from a suite file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from variants.feedforward import ACTIVATIONS
from variants.registry import available, build, make_config, register, spec
from variants.traffic import Traffic, embedding, layer_norm, linear, pointwise, softmax

# Filled in from ReformerLMConfig for every attention layer; attention_params may not override them.
_ATTENTION_SHAPE_KEYS = ("d_model", "n_heads", "causal")


@dataclass
class ReformerLMConfig:
    """Reformer LM hyper-parameters.

    attention: one attention variant name, or a tuple of names used as a per-layer pattern that
    repeats (("lsh", "full") alternates). attention_params: variant name -> extra parameters of that
    variant (e.g. {"lsh": {"n_hashes": 4, "bucket_size": 64}}). residual: registered residual
    variant name. ffn_chunks: sequence chunks of the feed-forward (1 = unchunked).
    axial_shape: None for a learned [max_seq_len, d_model] position table, else axis lengths whose
    product bounds the sequence length (one table per axis, widths summing to d_model).
    dropout: on the embeddings, inside attention and feed-forward.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_layers: int = 2
    max_seq_len: int = 65536
    attention: str | tuple[str, ...] = "lsh"
    attention_params: dict = field(default_factory=dict)
    residual: str = "reversible"
    ffn_chunks: int = 1
    activation: str = "gelu"
    axial_shape: tuple[int, ...] | None = None
    causal: bool = True
    dropout: float = 0.0

    @property
    def attention_pattern(self) -> tuple[str, ...]:
        """The per-layer attention names as a tuple (a single name is a pattern of one)."""
        return (self.attention,) if isinstance(self.attention, str) else tuple(self.attention)

    def attention_for_layer(self, layer: int) -> str:
        """Attention variant name of layer `layer` (0-based): the pattern repeated."""
        pattern = self.attention_pattern
        return pattern[layer % len(pattern)]

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent or name unregistered variants."""
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len", "ffn_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        attention_names = available("attention")
        pattern = self.attention_pattern
        unknown = [a for a in pattern + tuple(self.attention_params) if a not in attention_names]
        if not pattern or unknown:
            raise ValueError(
                f"unknown attention variant(s) {unknown or pattern!r}; registered attention variants: {', '.join(attention_names)}"
            )
        for name, params in self.attention_params.items():
            if not isinstance(params, dict):
                raise ValueError(f"attention_params[{name!r}] must be a dict, got {params!r}")
            fixed = sorted(set(params) & set(_ATTENTION_SHAPE_KEYS))
            if fixed:
                raise ValueError(f"attention_params[{name!r}] may not set {fixed}: they come from the model config")
        if self.residual not in available("residual"):
            raise ValueError(
                f"unknown residual variant {self.residual!r}; registered residual variants: {', '.join(available('residual'))}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.axial_shape is not None:
            if not self.axial_shape or any(n < 1 for n in self.axial_shape):
                raise ValueError(f"axial_shape must be non-empty positive lengths, got {self.axial_shape}")
            if len(self.axial_shape) > self.d_model:
                raise ValueError(f"axial_shape has more axes than d_model={self.d_model} features")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PreNorm(nn.Module):
    """module(LayerNorm(x)): the f / g of a pre-norm residual layer."""

    def __init__(self, d_model: int, module: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        return self.module(self.norm(x))

    def flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the wrapped module (the LayerNorm's elementwise work is not counted)."""
        return self.module.flops(batch, seq_len)

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """The LayerNorm's bytes plus the wrapped module's (variants/traffic.py)."""
        d = self.norm.normalized_shape[0]
        return layer_norm(batch * seq_len, d, element_size) + self.module.bytes_moved(batch, seq_len, element_size)


class LearnedPositions(nn.Module):
    """A learned [max_seq_len, d_model] position table."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_seq_len, d_model) * 0.02)

    def forward(self, seq_len: int) -> torch.Tensor:
        """Embeddings of positions 0..seq_len-1: [seq_len, d_model]."""
        return self.table[:seq_len]


class AxialPositions(nn.Module):
    """Axial position embedding: position p -> its mixed-radix digits over `shape` (last axis
    fastest), one small table per axis, concatenated along features.

    Axis i has a [shape[i], widths[i]] table; widths split d_model as evenly as possible.
    """

    def __init__(self, shape: tuple[int, ...], d_model: int):
        super().__init__()
        self.shape = tuple(shape)
        widths = [d_model // len(shape)] * len(shape)
        widths[-1] += d_model - sum(widths)
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(n, w) * 0.02) for n, w in zip(shape, widths))
        # stride of axis i: how many positions one step along it spans
        self.strides = [math.prod(self.shape[i + 1 :]) for i in range(len(self.shape))]

    def forward(self, seq_len: int) -> torch.Tensor:
        """Embeddings of positions 0..seq_len-1: [seq_len, d_model]."""
        positions = torch.arange(seq_len, device=self.tables[0].device)
        return torch.cat([table[(positions // stride) % n] for table, stride, n in zip(self.tables, self.strides, self.shape)], dim=-1)


def _build_layers(config: ReformerLMConfig) -> list[tuple[nn.Module, nn.Module]]:
    """The (PreNorm(attention), PreNorm(feed-forward)) pair of each layer, built via the registry."""
    layers = []
    for i in range(config.n_layers):
        name = config.attention_for_layer(i)
        params = {"dropout": config.dropout, **config.attention_params.get(name, {})}
        attention = build(name, d_model=config.d_model, n_heads=config.n_heads, causal=config.causal, **params)
        ffn = build(
            "ffn",
            d_model=config.d_model,
            d_ff=config.d_ff,
            n_chunks=config.ffn_chunks,
            activation=config.activation,
            dropout=config.dropout,
        )
        layers.append((PreNorm(config.d_model, attention), PreNorm(config.d_model, ffn)))
    return layers


def build_layer_stack(config: ReformerLMConfig) -> nn.Module:
    """The model's residual stack alone: [batch, seq_len, d_model] -> same (no final LayerNorm).

    The returned module has `flops(batch, seq_len)`: analytic forward FLOPs of all its layers.
    """
    config.validate()  # also when the config was constructed directly rather than via make_config
    return spec(config.residual).module_cls(make_config(config.residual), _build_layers(config))


def bits_per_dim(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy in bits per symbol.

    logits: [..., vocab]; targets: [...] long; mask: [...] (bool or 0/1), symbols to score, default all.
    Returns a scalar: mean over scored symbols of -log2 p(target) (nats / ln 2). Computed in float32
    or wider whatever the logits' dtype.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), targets.reshape(-1), reduction="none")
    if mask is None:
        return nats.mean() / math.log(2)
    weights = mask.reshape(-1).to(dtype)
    return (nats * weights).sum() / weights.sum() / math.log(2)


@register("reformer_lm", config=ReformerLMConfig, kind="model")
class ReformerLM(nn.Module):
    """Reformer language model: embeddings, registry-built residual stack, LayerNorm, vocab projection."""

    def __init__(self, config: ReformerLMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if config.axial_shape is None:
            self.positions: nn.Module = LearnedPositions(config.max_seq_len, config.d_model)
        else:
            self.positions = AxialPositions(config.axial_shape, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.stack = build_layer_stack(config)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    @property
    def max_len(self) -> int:
        """Longest sequence the positional embedding covers."""
        if self.config.axial_shape is None:
            return self.config.max_seq_len
        return min(self.config.max_seq_len, math.prod(self.config.axial_shape))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [batch, seq_len] long -> logits [batch, seq_len, vocab_size]."""
        seq_len = tokens.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds the positional embedding's {self.max_len}")
        x = self.dropout(self.token_embedding(tokens) + self.positions(seq_len))
        return self.head(self.norm(self.stack(x)))

    def loss_bpd(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar bits per dim of predicting `targets` from `tokens` [batch, seq_len].

        targets: [batch, seq_len] aligned with the logits; default None = next-token prediction
        (logits at t score tokens[t + 1]). mask: which symbols count, shaped like the symbols it
        scores: `targets` when given, else `tokens` (position 0 has no prediction and is dropped).
        """
        logits = self(tokens)
        if targets is None:
            logits, targets = logits[:, :-1], tokens[:, 1:]
            mask = None if mask is None else mask[:, 1:]
        return bits_per_dim(logits, targets, mask)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add): the layer stack plus the vocab projection."""
        return self.stack.flops(batch, seq_len) + 2 * batch * seq_len * self.config.d_model * self.config.vocab_size

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Analytic bytes per forward and backward of `loss_bpd` (variants/traffic.py): the token
        lookup, the position embeddings added, the stack, the final LayerNorm, the vocab projection
        (with bias) and the loss (a float32 log-softmax over the [rows, vocab] logits: read,
        written, read for the targets' entries; backward writes the logits' gradient)."""
        c = self.config
        rows = batch * seq_len
        inputs = embedding(rows, c.d_model, element_size) + pointwise(rows * c.d_model, element_size, inputs=2)
        head = layer_norm(rows, c.d_model, element_size) + linear(rows, c.d_model, c.vocab_size, element_size, bias=True)
        loss = softmax(rows * c.vocab_size, 4)
        return inputs + self.stack.bytes_moved(batch, seq_len, element_size) + head + loss
