"""Pluggable Reformer building blocks and their registry.

>>> import variants
>>> variants.available()            # registered names
>>> layer = variants.build("lsh", d_model=256, n_heads=4, n_hashes=4, bucket_size=64)
"""

# Importing the built-in modules registers their variants.
from variants import attention, feedforward, model, peers_model, residual  # noqa: E402,F401
from variants.registry import VariantUnavailable, available, build, describe, make_config, register, spec

__all__ = ["VariantUnavailable", "available", "build", "describe", "make_config", "register", "spec"]
