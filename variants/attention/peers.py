"""Peer attention implementations, registered beside ours so one suite sweeps them all.

- `hf_lsh`: HuggingFace transformers' `LSHSelfAttention` (the Reformer port of trax) plus a
  bias-free output projection;
- `reformer_pytorch_lsh`: lucidrains' `reformer_pytorch.LSHSelfAttention` (its own output
  projection `to_out` included);
- `sdpa_flash`, `sdpa_efficient`, `sdpa_math`: our `sdpa` variant with the SDPA backend chosen
  explicitly through `torch.nn.attention.sdpa_kernel`.

All take the same d_model / n_heads / causal (and bucket_size / n_hashes for the LSH peers) as our
variants and map [batch, seq_len, d_model] -> [batch, seq_len, d_model], with `flops(batch, seq_len)`
counting forward FLOPs (2 per multiply-add, projections included) of what each actually computes.

transformers and reformer_pytorch are optional (`pip install -e .[peers]`): this module imports
without them and only building `hf_lsh` / `reformer_pytorch_lsh` needs them. A missing package, or
an SDPA backend the device / dtype / inputs have no kernel for, raises `VariantUnavailable`, which
the harness records as a `skipped` row with the reason rather than as an `error`.
"""

from __future__ import annotations

import importlib
import logging
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from variants.attention.base import AttentionConfig
from variants.attention.full import SdpaAttention, SdpaAttentionConfig, full_attention_bytes
from variants.attention.lsh import lsh_attention_bytes
from variants.attention.lsh_hashing import bucket_factors
from variants.registry import VariantUnavailable, register
from variants.traffic import Traffic, linear, pointwise

PEERS_EXTRA = "pip install -e .[peers]"
# HF's automatic bucket count (`_set_num_buckets`) factorises the buckets above
# 2 * max(int(sqrt(max_position_embeddings // chunk_length)), chunk_length) of them. The layer itself
# uses max_position_embeddings for nothing else, so we pass ReformerConfig's default, 4096: the
# automatic choice is then the one HF makes with its default config, whatever seq_len is swept
# (for chunk_length >= 16 the limit is 2 * chunk_length, e.g. 128 buckets for chunk 64).
HF_MAX_POSITION_EMBEDDINGS = 4096


def require(module: str, package: str, variant: str) -> types.ModuleType:
    """Import `module` for `variant`; VariantUnavailable naming `package` and the extra if missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise VariantUnavailable(
            f"variant {variant!r} needs the optional package {package!r}, which is not installed "
            f"({type(error).__name__}: {error}); install the peers extra: {PEERS_EXTRA}"
        ) from error


def _validate_lsh(n_hashes: int, bucket_size: int, n_buckets: int | tuple[int, ...] | None = None) -> None:
    """Raise ValueError when the LSH fields of a peer config are inconsistent (as for `lsh`)."""
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be positive, got {n_hashes}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be positive, got {bucket_size}")
    if n_buckets is not None:
        bucket_factors(n_buckets, bucket_size, bucket_size)


# --------------------------------------------------------------------------- HuggingFace


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Silence `logger` below ERROR inside the block (HF warns every time it picks num_buckets)."""
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _hf_reformer() -> types.ModuleType:
    return require("transformers.models.reformer.modeling_reformer", "transformers", "hf_lsh")


def hf_auto_num_buckets(seq_len: int, chunk_length: int, max_position_embeddings: int = HF_MAX_POSITION_EMBEDDINGS) -> int | list[int]:
    """HF's automatic bucket count for a sequence of seq_len tokens, computed by HF's own code.

    Runs `LSHSelfAttention._set_num_buckets` on a stand-in object, so the result is whatever the
    installed transformers chooses: the largest power of two <= 2 * seq_len // chunk_length, or,
    above 2 * max(int(sqrt(max_position_embeddings // chunk_length)), chunk_length) buckets, two
    factors [2^(p // 2), 2^(p - p // 2)] (factorised hashing). E.g. seq_len 16384, chunk 64 -> [16, 32].
    """
    reformer = _hf_reformer()
    target = types.SimpleNamespace(
        chunk_length=chunk_length,
        max_position_embeddings=max_position_embeddings,
        num_buckets=None,
        config=types.SimpleNamespace(num_buckets=None),
    )
    logger = getattr(reformer, "logger", None) or logging.getLogger(reformer.__name__)
    with _quiet(logger):
        reformer.LSHSelfAttention._set_num_buckets(target, seq_len)
    return target.num_buckets


@dataclass
class HFLSHAttentionConfig(AttentionConfig):
    """AttentionConfig plus the LSH parameters, mapped onto HF's ReformerConfig.

    n_hashes -> num_hashes; bucket_size -> lsh_attn_chunk_length (chunk length; each chunk attends to
    itself and one chunk before: lsh_num_chunks_before=1, lsh_num_chunks_after=0); n_buckets ->
    num_buckets (None -> HF's automatic choice for each sequence length, `hf_auto_num_buckets`);
    seed -> hash_seed (None -> rotations from the global RNG); causal -> is_decoder.
    """

    n_hashes: int = 1
    bucket_size: int = 64
    n_buckets: int | tuple[int, ...] | None = None
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        _validate_lsh(self.n_hashes, self.bucket_size, self.n_buckets)

    def check_seq_len(self, seq_len: int) -> None:
        """Up to bucket_size: no hashing (any length); beyond it, a multiple of bucket_size."""
        if seq_len > self.bucket_size and seq_len % self.bucket_size:
            raise ValueError(f"hf_lsh: seq_len={seq_len} is not a multiple of bucket_size={self.bucket_size}")


@register("hf_lsh", config=HFLSHAttentionConfig)
class HFLSHAttention(nn.Module):
    """HuggingFace transformers' Reformer LSHSelfAttention plus a bias-free output projection (peer).

    `self.attn` is `transformers.models.reformer.modeling_reformer.LSHSelfAttention` built from
    ReformerConfig(hidden_size=d_model, num_attention_heads=n_heads, attention_head_size=d_model //
    n_heads, lsh_attn_chunk_length=bucket_size, num_hashes=n_hashes, num_buckets=n_buckets,
    lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=causal, hash_seed=seed,
    max_position_embeddings=4096 (HF's default; see HF_MAX_POSITION_EMBEDDINGS), all dropout 0);
    its query_key and value projections are bias-free like our fused in_proj. `self.out_proj`
    (Linear(d_model, d_model, bias=False), as HF's ReformerSelfOutput) and dropout on its output
    make the layer do the same work as our AttentionModule.

    Semantics are ours (`lsh`): shared QK, keys length-normalised, logits q . k_hat, self penalty
    -1e5, causal -1e9; seq_len <= bucket_size runs HF's standard (full) self-attention. With a seed,
    HF calls torch.manual_seed(seed) in every forward (the global RNG is reset), as HF does.
    Lengths above bucket_size must be multiples of it.
    """

    def __init__(self, config: HFLSHAttentionConfig):
        super().__init__()
        reformer = _hf_reformer()
        self.config = config
        hf_config = reformer.ReformerConfig(
            hidden_size=config.d_model,
            num_attention_heads=config.n_heads,
            attention_head_size=config.head_dim,
            attn_layers=["lsh"],
            lsh_attn_chunk_length=config.bucket_size,
            num_hashes=config.n_hashes,
            num_buckets=list(config.n_buckets) if isinstance(config.n_buckets, tuple) else config.n_buckets,
            lsh_num_chunks_before=1,
            lsh_num_chunks_after=0,
            is_decoder=config.causal,
            hash_seed=config.seed,
            max_position_embeddings=HF_MAX_POSITION_EMBEDDINGS,
            lsh_attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
        )
        self.attn = reformer.LSHSelfAttention(hf_config)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self._auto_buckets: dict[int, int | list[int]] = {}

    def num_buckets(self, seq_len: int) -> int | list[int] | None:
        """Buckets per hashing round at seq_len: n_buckets, else HF's automatic choice (int, or two
        factors when HF factorises); None when seq_len <= bucket_size (no hashing)."""
        if seq_len <= self.config.bucket_size:
            return None
        if self.config.n_buckets is not None:
            n_buckets = self.config.n_buckets
            return list(n_buckets) if isinstance(n_buckets, tuple) else n_buckets
        if seq_len not in self._auto_buckets:
            self._auto_buckets[seq_len] = hf_auto_num_buckets(seq_len, self.config.bucket_size)
        return self._auto_buckets[seq_len]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        seq_len = x.shape[1]
        buckets = self.num_buckets(seq_len)
        if buckets is not None:
            self.config.check_seq_len(seq_len)
            # HF keeps the first automatic choice for every later length; set it per length instead.
            self.attn.num_buckets = buckets
            self.attn.config.num_buckets = buckets
        heads = self.attn(x).hidden_states  # [batch, seq_len, n_heads * head_dim]
        return self.dropout(self.out_proj(heads))

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add): qk, v and output projections, the hashing
        matmul over the rotations HF draws (sum of the factors / 2 per round when it factorises),
        and per round seq_len x 2 * bucket_size QK and PV dot products per head; at seq_len <=
        bucket_size full attention instead of hashing and chunks."""
        c = self.config
        d = c.d_model
        projections = 3 * 2 * batch * seq_len * d * d
        if self.num_buckets(seq_len) is None:
            return projections + 2 * 2 * batch * seq_len * seq_len * d
        chunks = 2 * 2 * batch * c.n_hashes * seq_len * 2 * c.bucket_size * d
        return projections + self.no_backward_flops(batch, seq_len) + chunks

    def no_backward_flops(self, batch: int, seq_len: int) -> int:
        """The forward FLOPs that have no backward: the hashing matmul (its argmax passes no gradient)."""
        buckets = self.num_buckets(seq_len)
        if buckets is None:
            return 0
        rotations = buckets if isinstance(buckets, int) else sum(buckets)
        return 2 * batch * seq_len * self.config.d_model * self.config.n_hashes * (rotations // 2)

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Analytic bytes per forward and backward (variants/traffic.py): the qk, v and output
        projections, HF's head merge (a copy) and its LSH core op by op (`lsh_attention_bytes`, not
        fused); at seq_len <= bucket_size shared-QK full attention (`full_attention_bytes`)."""
        c = self.config
        rows, d = batch * seq_len, c.d_model
        out = linear(rows, d, d, element_size).times(3) + pointwise(rows * d, element_size)
        buckets = self.num_buckets(seq_len)
        if buckets is None:
            return out + full_attention_bytes(
                batch * c.n_heads, seq_len, c.head_dim, element_size, scaled=False, masks=1 + int(c.causal), normalize_keys=True
            )
        rotations = (buckets if isinstance(buckets, int) else sum(buckets)) // 2
        core = lsh_attention_bytes(
            batch * c.n_heads,
            seq_len,
            c.head_dim,
            element_size,
            n_hashes=c.n_hashes,
            bucket_size=c.bucket_size,
            rotations=rotations,
            causal=c.causal,
        )
        return out + core


# --------------------------------------------------------------------------- lucidrains


@dataclass
class ReformerPytorchLSHConfig(AttentionConfig):
    """AttentionConfig plus n_hashes, bucket_size (chunk length, as ours) and seed (None -> rotations
    from the global RNG every forward; an int -> fixed rotations, the global RNG left untouched).

    The bucket count per round is not configurable: reformer_pytorch derives it as
    seq_len // bucket_size (see ReformerPytorchLSHAttention).
    """

    n_hashes: int = 1
    bucket_size: int = 64
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        _validate_lsh(self.n_hashes, self.bucket_size)

    def check_seq_len(self, seq_len: int) -> None:
        """Up to bucket_size: full attention (any length); beyond it, a multiple of 2 * bucket_size."""
        if seq_len > self.bucket_size and seq_len % (2 * self.bucket_size):
            raise ValueError(f"reformer_pytorch_lsh: seq_len={seq_len} must be a multiple of 2 * bucket_size={2 * self.bucket_size}")


@register("reformer_pytorch_lsh", config=ReformerPytorchLSHConfig)
class ReformerPytorchLSHAttention(nn.Module):
    """lucidrains' reformer_pytorch LSHSelfAttention, output projection included (peer).

    `self.attn` is `reformer_pytorch.reformer_pytorch.LSHSelfAttention(dim=d_model, heads=n_heads,
    dim_head=d_model // n_heads, bucket_size=bucket_size, n_hashes=n_hashes, causal=causal,
    dropout=0, post_attn_dropout=dropout)`: projections toqk, tov (bias-free) and to_out (with a
    bias, which ours lacks).

    Bucket mapping. Its LSHAttention sets n_buckets = seq_len // bucket_size and splits the
    n_hashes * seq_len sorted items into n_hashes * n_buckets chunks, i.e. chunks of exactly
    bucket_size items, each attending to itself and the chunk before (cyclic). So its bucket_size
    *is* our chunk length and is passed through unchanged. What differs is the bucket count: it
    hashes into seq_len // bucket_size buckets per round (about one chunk per bucket), where ours
    and HF use 2 * seq_len // bucket_size (two buckets per chunk; HF a power of two, factorised
    for long sequences). Its hashing matmul is therefore seq_len / (2 * bucket_size) rotations
    per round, quadratic in seq_len (no factorisation).

    Other differences from ours: logits are q . k_hat / sqrt(head_dim) (keys F.normalize'd; ours
    and HF have no 1/sqrt(head_dim)), the self penalty is -5e4, masked logits -finfo.max, one set
    of rotations shared by all heads. It needs seq_len % (2 * bucket_size) == 0; at seq_len <=
    bucket_size it runs its full shared-QK attention. In training mode it caches the last buckets
    (for its reversible network) as the package does.
    """

    def __init__(self, config: ReformerPytorchLSHConfig):
        super().__init__()
        module = require("reformer_pytorch.reformer_pytorch", "reformer-pytorch", "reformer_pytorch_lsh")
        self.config = config
        self.attn = module.LSHSelfAttention(
            dim=config.d_model,
            heads=config.n_heads,
            dim_head=config.head_dim,
            bucket_size=config.bucket_size,
            n_hashes=config.n_hashes,
            causal=config.causal,
            dropout=0.0,
            post_attn_dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        self.config.check_seq_len(x.shape[1])
        if self.config.seed is None:
            return self.attn(x)
        with _seeded(self.config.seed, x.device):
            return self.attn(x)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add): toqk, tov and to_out projections (bias adds not
        counted), the hashing matmul ((seq_len // bucket_size) / 2 rotations per round), and per round
        seq_len x 2 * bucket_size QK and PV dot products per head; at seq_len <= bucket_size full attention."""
        c = self.config
        d = c.d_model
        projections = 3 * 2 * batch * seq_len * d * d
        if seq_len <= c.bucket_size:
            return projections + 2 * 2 * batch * seq_len * seq_len * d
        chunks = 2 * 2 * batch * c.n_hashes * seq_len * 2 * c.bucket_size * d
        return projections + self.no_backward_flops(batch, seq_len) + chunks

    def no_backward_flops(self, batch: int, seq_len: int) -> int:
        """The forward FLOPs that have no backward: the hashing matmul (its argmax passes no gradient)."""
        c = self.config
        if seq_len <= c.bucket_size:
            return 0
        return 2 * batch * seq_len * c.d_model * c.n_hashes * ((seq_len // c.bucket_size) // 2)

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Analytic bytes per forward and backward (variants/traffic.py): the toqk, tov and to_out
        (with its bias) projections, the head merge (a copy) and the LSH core op by op
        (`lsh_attention_bytes`, not fused, (seq_len // bucket_size) / 2 rotations per round); at
        seq_len <= bucket_size shared-QK full attention (`full_attention_bytes`)."""
        c = self.config
        rows, d = batch * seq_len, c.d_model
        out = linear(rows, d, d, element_size).times(2) + linear(rows, d, d, element_size, bias=True) + pointwise(rows * d, element_size)
        if seq_len <= c.bucket_size:
            return out + full_attention_bytes(
                batch * c.n_heads, seq_len, c.head_dim, element_size, masks=1 + int(c.causal), normalize_keys=True
            )
        core = lsh_attention_bytes(
            batch * c.n_heads,
            seq_len,
            c.head_dim,
            element_size,
            n_hashes=c.n_hashes,
            bucket_size=c.bucket_size,
            rotations=(seq_len // c.bucket_size) // 2,
            causal=c.causal,
        )
        return out + core


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the RNG of `device` (CPU generator, or that CUDA device's) inside the block, then restore it."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            state = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            try:
                yield
            finally:
                torch.cuda.set_rng_state(state)
        return
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


# --------------------------------------------------------------------------- SDPA backends

# What torch says when the selected backend(s) have no kernel for the inputs (CUDA / CPU wording).
_NO_KERNEL = ("No available kernel", "No viable backend")


class _SdpaBackendAttention(SdpaAttention):
    """`sdpa` with one SDPA backend forced by `torch.nn.attention.sdpa_kernel` (subclasses name it)."""

    backend: str = ""  # a torch.nn.attention.SDPBackend member name

    def attend(self, *heads: torch.Tensor) -> torch.Tensor:
        """(q, k, v) or (qk, v), each [batch, heads, seq_len, head_dim] -> same shape, on `backend`.

        VariantUnavailable when the backend has no kernel for these inputs here (device, dtype,
        mask, head_dim), with torch's reasons; other errors (out of memory ...) propagate unchanged.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.backend)
        try:
            with sdpa_kernel(backend):
                return super().attend(*heads)
        except RuntimeError as error:
            if not any(text in str(error) for text in _NO_KERNEL):
                raise
            reasons = self._reasons(heads, backend)
            raise VariantUnavailable(
                f"{self.variant_name}: SDPA backend {self.backend} has no kernel for these inputs on "
                f"{heads[0].device.type} ({heads[0].dtype}, shared_qk={self.config.shared_qk}, "
                f"causal={self.config.causal}): {error}{'; ' + ' | '.join(reasons) if reasons else ''}"
            ) from error

    def _reasons(self, heads: tuple[torch.Tensor, ...], backend: Any) -> list[str]:
        """torch's warnings explaining why `backend` was rejected (collected by calling it again)."""
        from torch.nn.attention import sdpa_kernel

        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    super().attend(*(h.detach() for h in heads))
            except RuntimeError:
                pass
        return [" ".join(str(w.message).split())[:300] for w in caught]


@register("sdpa_flash", config=SdpaAttentionConfig)
class SdpaFlashAttention(_SdpaBackendAttention):
    """`sdpa` forced onto the FLASH_ATTENTION backend (CUDA: fp16/bf16 only; CPU: torch's CPU kernel).

    On CUDA flash takes no attn_mask, so not shared_qk either; such combinations raise
    VariantUnavailable (skipped rows), not errors."""

    backend = "FLASH_ATTENTION"


@register("sdpa_efficient", config=SdpaAttentionConfig)
class SdpaEfficientAttention(_SdpaBackendAttention):
    """`sdpa` forced onto the EFFICIENT_ATTENTION (memory-efficient) backend; CUDA only."""

    backend = "EFFICIENT_ATTENTION"


@register("sdpa_math", config=SdpaAttentionConfig)
class SdpaMathAttention(_SdpaBackendAttention):
    """`sdpa` forced onto the MATH backend (torch's composite reference; any device)."""

    backend = "MATH"

    def core_flops(self, batch: int, seq_len: int) -> int:
        """QK^T and PV over all seq_len^2 pairs: the math backend computes masked blocks too."""
        return 2 * 2 * batch * seq_len * seq_len * self.config.d_model

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """The math backend op by op (`full_attention_bytes`: the queries scaled instead of the
        logits, the same passes; shared_qk adds its [seq_len, seq_len] mask and normalised keys)."""
        c = self.config
        masks = int(c.causal or c.shared_qk)
        return full_attention_bytes(batch * c.n_heads, seq_len, c.head_dim, element_size, masks=masks, normalize_keys=c.shared_qk)
