"""Attention variants: `full`, `sdpa`, `lsh`, `local`, `linformer`, `performer`, `linear` and `flex`, and
the peers `hf_lsh`, `reformer_pytorch_lsh`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math` (import
registers them; the peers' optional packages are imported only when one is built)."""

from variants.attention import flex, full, linear, linformer, local, lsh, peers, performer  # noqa: F401  (registration side effects)
from variants.attention.base import AttentionConfig, AttentionModule

__all__ = ["AttentionConfig", "AttentionModule"]
