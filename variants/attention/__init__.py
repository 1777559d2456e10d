"""Attention variants: `full`, `sdpa` and `lsh` (import registers them)."""

from variants.attention import full, lsh  # noqa: F401  (registration side effects)
from variants.attention.base import AttentionConfig, AttentionModule

__all__ = ["AttentionConfig", "AttentionModule"]
