"""FlexAttention (torch.nn.attention.flex_attention; Dong et al. 2024, "Flex Attention: A Programming
Model for Generating Optimized Attention Kernels", arXiv 2412.05496) with mask presets: variant `flex`.

Softmax attention, scale 1 / sqrt(head_dim), restricted by a `mask_mod` compiled into a BlockMask
of 128 x 128 tiles; the compiled kernels visit only the tiles holding an allowed pair (`core_flops`
counts those; eager flex computes every pair). Presets:

- `none`: every pair (non-causal only);
- `causal`: key <= query;
- `sliding_window`: |query - key| < window; causal: query - window < key <= query (window keys);
- `document`: positions in consecutive documents of `block` tokens (document = position // block)
  attend within their own document; causal: and key <= query.

`mask` None follows the model's `causal`: `causal` when causal, else `none`.

Where it runs (torch 2.13; tests/variants/test_flex.py checks it): on CPU the forward works eager
(an unfused reference that materialises [seq_len, seq_len] scores) and compiled (a fused C++
kernel; the first compile takes tens of seconds), but there is no CPU backward: torch raises
NotImplementedError as soon as an input requires grad. That, a torch without flex_attention, or a
compiler that cannot build the kernel raises `VariantUnavailable` (a `skipped` row), not a crash.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import full_attention_bytes
from variants.registry import VariantUnavailable, register
from variants.traffic import Traffic, fused_attention

PRESETS = ("none", "causal", "sliding_window", "document")
TILE = 128  # BlockMask tile (torch's default BLOCK_SIZE)
MaskMod = Callable[[Any, Any, Any, Any], Any]  # (batch, head, q_idx, kv_idx) -> bool tensor


def _flex_module() -> Any:
    """torch.nn.attention.flex_attention, or VariantUnavailable when this torch lacks it."""
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError as error:
        raise VariantUnavailable(f"flex: this torch ({torch.__version__}) has no torch.nn.attention.flex_attention ({error})") from error
    return module


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention under torch.compile (built once; compiled per shape on first call)."""
    return torch.compile(_flex_module().flex_attention, dynamic=False)


@functools.cache
def _compiled_block_mask() -> Callable[..., Any]:
    """create_block_mask under torch.compile (torch's advice for long sequences on GPU)."""
    return torch.compile(_flex_module().create_block_mask)


def mask_mod(preset: str, causal: bool, window: int, block: int) -> MaskMod | None:
    """The mask_mod of a preset (None: no mask), as FlexAttention calls it on index tensors."""
    if preset == "none":
        return None
    if preset == "causal":
        return lambda b, h, q, kv: q >= kv
    if preset == "sliding_window":
        if causal:
            return lambda b, h, q, kv: (q >= kv) & (q - kv < window)
        return lambda b, h, q, kv: (q - kv < window) & (kv - q < window)
    if preset == "document":
        if causal:
            return lambda b, h, q, kv: (q // block == kv // block) & (q >= kv)
        return lambda b, h, q, kv: q // block == kv // block
    raise ValueError(f"unknown mask preset {preset!r}; presets: {', '.join(PRESETS)}")


def tile_pairs(preset: str, causal: bool, window: int, block: int, seq_len: int, tile: int = TILE) -> torch.Tensor:
    """[n_tiles, n_tiles] bool: which (query tile, key tile) pairs hold at least one allowed pair.

    From the intervals each tile covers (exact, no [seq_len, seq_len] grid): tile a holds
    positions a * tile .. min((a + 1) * tile, seq_len) - 1.
    """
    starts = torch.arange(0, seq_len, tile)
    ends = torch.clamp(starts + tile, max=seq_len) - 1
    q0, q1, k0, k1 = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    if preset == "none":
        return torch.ones(len(starts), len(starts), dtype=torch.bool)
    if preset == "causal":
        return k0 <= q1
    if preset == "sliding_window":
        if causal:
            return (k0 <= q1) & (q0 - k1 < window)
        return (k0 - q1 < window) & (q0 - k1 < window)
    if preset == "document":
        first, last = torch.maximum(q0 // block, k0 // block), torch.minimum(q1 // block, k1 // block)
        if not causal:
            return first <= last

        # Within document D the keys start at max(k0, D * block), the queries end at min(q1, D * block + block - 1).
        def sees(doc: torch.Tensor) -> torch.Tensor:
            return torch.maximum(k0, doc * block) <= torch.minimum(q1, doc * block + block - 1)

        return (first <= last) & ((last - first >= 2) | sees(first) | sees(last))
    raise ValueError(f"unknown mask preset {preset!r}; presets: {', '.join(PRESETS)}")


def _compile_failure() -> tuple[type[BaseException], ...]:
    """The exception torch.compile raises when its backend cannot build a kernel (none if unknown)."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:
        return ()
    return (BackendCompilerFailed,)


@dataclass
class FlexAttentionConfig(AttentionConfig):
    """AttentionConfig plus the FlexAttention mask.

    mask: none | causal | sliding_window | document, or None (follow `causal`); window: sliding
    window (positions); block: document length (positions); compile: run flex_attention under
    torch.compile (the fused kernel; False runs torch's unfused eager reference).
    """

    mask: str | None = None
    window: int = 256
    block: int = 256
    compile: bool = True

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent (a preset that contradicts `causal` included)."""
        super().validate()
        if self.mask is not None and self.mask not in PRESETS:
            raise ValueError(f"mask must be one of {', '.join(PRESETS)} (or None: follow causal), got {self.mask!r}")
        if self.mask == "none" and self.causal:
            raise ValueError("mask 'none' lets every position see later ones; a causal layer needs mask causal, sliding_window or document")
        if self.mask == "causal" and not self.causal:
            raise ValueError("mask 'causal' in a non-causal layer: set causal true, or use mask none")
        if self.window < 1 or self.block < 1:
            raise ValueError(f"window and block must be positive, got {self.window}, {self.block}")

    @property
    def preset(self) -> str:
        """The preset in effect: mask, else causal / none from `causal`."""
        if self.mask is not None:
            return self.mask
        return "causal" if self.causal else "none"


@register("flex", config=FlexAttentionConfig)
class FlexAttention(AttentionModule):
    """torch FlexAttention with a mask preset (none, causal, sliding_window, document); CPU: forward only."""

    def __init__(self, config: FlexAttentionConfig):
        super().__init__(config, n_inputs=3)
        self._block_masks: dict[tuple[int, str], Any] = {}

    def mask_mod(self) -> MaskMod | None:
        """This layer's mask_mod (None: no mask)."""
        c = self.config
        return mask_mod(c.preset, c.causal, c.window, c.block)

    def block_mask(self, seq_len: int, device: torch.device) -> Any:
        """The BlockMask at seq_len on device (built once per length and device), or None for `none`."""
        key = (seq_len, str(device))
        if key not in self._block_masks:
            mod = self.mask_mod()
            if mod is None:
                self._block_masks[key] = None
            else:
                create = _flex_module().create_block_mask
                if self.config.compile and device.type == "cuda":  # eager creation holds a [seq_len, seq_len] mask
                    create = _compiled_block_mask()
                self._block_masks[key] = create(mod, None, None, seq_len, seq_len, device=device)
        return self._block_masks[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [batch, heads, seq_len, head_dim] -> same shape. VariantUnavailable where torch has
        no kernel for it here (CPU with gradients, no flex_attention, the compiler failing)."""
        flex = _compiled_flex() if self.config.compile else _flex_module().flex_attention
        compile_failed = _compile_failure() if self.config.compile else ()
        where = f"{q.device.type}, {q.dtype}, requires_grad={q.requires_grad}, compile={self.config.compile}, torch {torch.__version__}"
        try:
            block_mask = self.block_mask(q.shape[-2], q.device)
            return flex(q, k, v, block_mask=block_mask)
        except NotImplementedError as error:  # e.g. "FlexAttention does not support backward on CPU"
            raise VariantUnavailable(f"flex: not supported here ({where}): {error}") from error
        except compile_failed as error:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise VariantUnavailable(f"flex: torch.compile could not build the kernel ({where}): {first}") from error

    def core_flops(self, batch: int, seq_len: int) -> int:
        """QK^T and PV over the pairs computed: compiled, every pair of the 128 x 128 tiles that hold an
        allowed pair (partial tiles in full); eager, all seq_len^2 pairs (its scores are dense)."""
        c = self.config
        if not c.compile:
            return 2 * 2 * batch * seq_len * seq_len * c.d_model
        tiles = tile_pairs(c.preset, c.causal, c.window, c.block, seq_len).to(torch.int64)
        lengths = torch.clamp(seq_len - torch.arange(0, seq_len, TILE), max=TILE)  # positions per tile
        pairs = int((lengths[:, None] * tiles * lengths[None, :]).sum())
        return 2 * 2 * batch * pairs * c.d_model

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Compiled: a fused kernel (`fused_attention`; the key and value tiles a query tile visits
        are counted once, as if cached). Eager: the dense scores op by op (`full_attention_bytes`,
        scaled, one mask pass)."""
        c = self.config
        if not c.compile:
            return full_attention_bytes(batch * c.n_heads, seq_len, c.head_dim, element_size, masks=int(self.mask_mod() is not None))
        return fused_attention(batch * c.n_heads, seq_len, c.head_dim, element_size)
