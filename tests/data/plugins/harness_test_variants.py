"""Test-only attention variants that misbehave on purpose (crash, hang, wait for a file).

Loaded into the spawned cell processes through REFORMER_HARNESS_PLUGINS=harness_test_variants
with this folder on sys.path; never registered in normal runs.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from variants.attention.base import AttentionConfig
from variants.registry import register


@dataclass
class CrashConfig(AttentionConfig):
    signal_name: str = "SIGKILL"


@register("test_crash", config=CrashConfig)
class CrashAttention(nn.Module):
    """Test-only: sends its own process `signal_name` when called."""

    def __init__(self, config: CrashConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), getattr(signal, self.config.signal_name))
        return x

    def flops(self, batch: int, seq_len: int) -> int:
        return 0


@dataclass
class SleepConfig(AttentionConfig):
    seconds: float = 60.0


@register("test_sleep", config=SleepConfig)
class SleepAttention(nn.Module):
    """Test-only: sleeps `seconds` when called."""

    def __init__(self, config: SleepConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.config.seconds)
        return x

    def flops(self, batch: int, seq_len: int) -> int:
        return 0


@dataclass
class HoldConfig(AttentionConfig):
    hold_file: str = ""  # while this file exists, calls at seq_len >= from_seq_len wait
    from_seq_len: int = 0
    seconds: float = 120.0  # the longest a call waits


@register("test_hold", config=HoldConfig)
class HoldAttention(nn.Module):
    """Test-only: the identity, except that a call on a sequence of at least `from_seq_len`
    positions waits while `hold_file` exists (at most `seconds`), so a test decides when a cell
    may finish (tests/harness/test_slurm.py: a job held past its time limit, or cancelled)."""

    def __init__(self, config: HoldConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] >= self.config.from_seq_len:
            deadline = time.monotonic() + self.config.seconds
            while self.config.hold_file and os.path.exists(self.config.hold_file) and time.monotonic() < deadline:
                time.sleep(0.1)
        return x

    def flops(self, batch: int, seq_len: int) -> int:
        return 0
