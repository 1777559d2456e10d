"""Shared test setup: make the repository importable when pytest is run as a plain command."""

import os
import sys
from pathlib import Path

# Triton kernels on CPU tensors run in Triton's interpreter, which must be on before triton is first
# imported (tests/variants/test_lsh_triton.py; a no-op without triton).
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
