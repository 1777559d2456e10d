"""Attention variants: `full`, `sdpa` and `lsh`, and the peers `hf_lsh`, `reformer_pytorch_lsh`,
`sdpa_flash`, `sdpa_efficient`, `sdpa_math` (import registers them; the peers' optional packages
are imported only when one is built)."""

from variants.attention import full, lsh, peers  # noqa: F401  (registration side effects)
from variants.attention.base import AttentionConfig, AttentionModule

__all__ = ["AttentionConfig", "AttentionModule"]
