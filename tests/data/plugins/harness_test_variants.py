"""Test-only attention variants that misbehave on purpose (crash, hang).

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
