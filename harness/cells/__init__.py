"""Cells: the unit of work of a run, one protocol for every kind of suite.

A suite (harness.suites) expands into cells; the cell runner (harness.runner) and the executors
(harness.executors) run them, each in its own process (harness.isolation), and store one row per
cell under its key (harness.store). Two kinds implement the protocol:

- `harness.cells.benchmark.BenchmarkCell`: one measured call (time, peak memory) of a workload;
- `harness.cells.quality.QualityCell`: one training run (learning curve, evaluations), whose
  process also writes its curve and eval rows into the run folder as it goes.

This module holds the protocol and what both kinds share (configuration JSON, model and variant
fields, throughput guesses for estimates); it imports neither kind.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Protocol, runtime_checkable

from harness.store.schema import CAUSAL, D_MODEL, N_HEADS

# Taken from a suite's `model:` rather than from a variant entry; the attention variant gets them from there.
MODEL_ATTENTION_KEYS = (D_MODEL, N_HEADS, CAUSAL)
NOT_MODEL_KEYS = ("attention", "attention_params")  # set by `variants:`
# A benchmark cell's model may name the model-kind variant a `model` workload builds (a peer LM,
# harness.store.schema.MODEL_VARIANT); absent means ours (DEFAULT_MODEL_VARIANT). It travels in the
# cell's model dict, so it is part of the key and a row column.

CPU_FLOP_S = 50e9  # deliberately round guesses of achieved throughput, for a-priori estimates
CUDA_FLOP_S = 100e12
PROCESS_START_S = 3.0  # spawning a subprocess and importing torch


@runtime_checkable
class Cell(Protocol):
    """What the runner, the executors and the store need of a cell, whatever its kind.

    A cell is a frozen, picklable value (executors send it to other processes). Its row (the
    `cell_key` `key(code_version)`) is `to_row()` plus the columns `execute` returns.
    """

    suite: str
    device: str  # "cpu" / "cuda"
    seq_len: int | None  # tokens per sequence (None when only the data knows it)

    def key(self, code_version: str) -> str:
        """Identity of (configuration, code version): the `cell_key` of its row (16 hex)."""
        ...

    def group_key(self) -> str:
        """Cells of one group run in order, in one worker, and longer lengths are skipped after a
        failure (`skip_after_failure`); a cell alone in its group returns its own key."""
        ...

    def to_row(self) -> dict[str, Any]:
        """The configuration columns of its rows (what --filter expressions see)."""
        ...

    def describe(self) -> str:
        """A short label for progress lines ("LSH-2 L=1024 B=1")."""
        ...

    def estimate_seconds(self) -> float:
        """A rough a-priori wall time (s) for --dry-run and the ETA."""
        ...

    def timeout_s(self) -> float:
        """Wall-clock limit (s) of its process, counted from the process start."""
        ...

    def memory_limit_bytes(self) -> int | None:
        """Resident-memory budget (bytes above the process's baseline) the parent enforces on CPU;
        None where the cell limits itself (CUDA)."""
        ...

    def skip_after_failure(self) -> bool:
        """Whether longer lengths of its group are skipped after it ends `oom` / `timeout`."""
        ...

    def with_threads(self, threads: int) -> Cell:
        """The same cell with `threads` torch CPU threads (--threads)."""
        ...

    def execute(
        self, root: str, suite: str, run_id: str, code_version: str, limit_memory: bool, report_baseline: Callable[[int], None] | None
    ) -> dict[str, Any]:
        """Do the work in this process: the columns of its row, `status` ("ok", "oom", "error",
        "skipped") and `message` included. With `limit_memory` (its own process) it starts its
        memory limit and reports its baseline RSS (bytes) through `report_baseline`. A cell that
        writes rows of its own (training curves) writes them into the run root/suite/run_id."""
        ...

    def progress_text(self, row: dict[str, Any]) -> str:
        """The outcome part of a progress line for its finished row."""
        ...

    # Optional (harness.runner.cell_rounds; a cell without them is measured once):
    # measure_rounds() -> int: how many rounds the runner measures it in; round_seed() -> int: the
    # seed of the shuffled order of rounds 2..K; combine_rounds(rows) -> dict: its own row from the
    # ok rows of its rounds (row_type harness.store.schema.ROUND_ROW), in round order.


def execute_in_cell_process(
    cell: Cell, root: str, suite: str, run_id: str, code_version: str, report_baseline: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """The work of a cell's own process (`isolation.run_isolated`): `cell.execute` with the memory limit on."""
    return cell.execute(root, suite, run_id, code_version, True, report_baseline)


# --------------------------------------------------------------------------- configuration helpers


def jsonable(value: Any) -> Any:
    """Tuples -> lists recursively, so configs compare and hash the same after a JSON round trip."""
    return json.loads(json.dumps(value))


def model_fields() -> dict[str, tuple[Any, Any]]:
    """ReformerLMConfig field -> (annotation, default or MISSING), without attention/attention_params."""
    from variants.model import ReformerLMConfig

    hints = typing.get_type_hints(ReformerLMConfig)
    out = {}
    for f in dataclasses.fields(ReformerLMConfig):
        if f.name in NOT_MODEL_KEYS:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        out[f.name] = (hints[f.name], default)
    return out


def variant_fields(name: str) -> dict[str, tuple[Any, Any]]:
    """Registered variant `name`'s config field -> (annotation, default)."""
    import variants

    spec = variants.spec(name)
    hints = typing.get_type_hints(spec.config_cls)
    defaults = variants.describe(name)
    return {n: (hints[n], defaults[n][1]) for n in spec.parameters()}
