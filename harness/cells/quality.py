"""Training cells (quality suites): one ReformerLM trained on a task, its learning curve in bits
per dim, then its final model evaluated with each of a list of attention configurations (paper
Table 2: a model trained with one attention, evaluated with others).

`QualityCell.execute` (in the cell's own process) trains, writing one `curve` row per eval point
into the run folder as it goes and a checkpoint to `<run>/checkpoints/<key>.pt` (so an interrupted
cell continues from it on `--resume`), then one `eval` row per evaluation; the runner stores the
cell's own `train` row (status, rows written, final numbers) under its key. Accuracies are percent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from harness.cells import CPU_FLOP_S, CUDA_FLOP_S, PROCESS_START_S, jsonable, variant_fields
from harness.isolation import default_memory_limit_bytes, start_memory_limit
from harness.measurement import is_oom_error
from harness.store.schema import (
    ACCURACY,
    BATCH_SIZE,
    BPD,
    CELL_KEY,
    CODE_VERSION,
    CURVE_ROW,
    D_FF,
    D_MODEL,
    DEVICE,
    DEVICE_NAME,
    EVAL_ACCURACY,
    EVAL_BPD,
    EVAL_ROW,
    EVAL_SYMBOLS,
    EVAL_VARIANT,
    EVAL_VARIANT_NAME,
    EVAL_VARIANT_PARAMS,
    EVAL_WALL_S,
    FINAL_ACCURACY,
    FINAL_EVAL_BPD,
    FLOAT32_MATMUL_PRECISION,
    GRAD_ACCUM,
    KIND,
    KIND_QUALITY,
    LR,
    MAX_SEQ_LEN,
    MESSAGE,
    N_LAYERS,
    N_PARAMS,
    OPTIONAL_PACKAGES,
    PEAK_LR,
    RECORDED_AT,
    RESIDUAL,
    ROW_TYPE,
    ROWS_WRITTEN,
    SCHEDULE,
    SEED,
    SEQ_LEN,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    STEP,
    SUITE,
    TASK,
    TASK_PARAMS,
    THREADS,
    TOKENS_SEEN,
    TRAIN_BPD,
    TRAIN_CONFIG,
    TRAIN_KEY,
    TRAIN_ROW,
    TRAIN_STEPS,
    TRAIN_VARIANT,
    TRAIN_WALL_S,
    VARIANT,
    VARIANT_LABEL,
    VARIANT_PARAM_PREFIX,
    VARIANT_PARAMS,
    VOCAB_SIZE,
    WALL_S,
    canonical_json,
)
from harness.store.writer import RunStore
from variants.model import ReformerLMConfig


@dataclass(frozen=True)
class AttentionChoice:
    """One attention configuration: registry name, its parameters and a display label."""

    name: str
    params: dict[str, Any]
    label: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": jsonable(self.params), "label": self.label}


@dataclass(frozen=True)
class QualityCell:
    """One training run: task, model settings, the trained attention, train/eval settings, and the
    attention configurations its final model is evaluated with."""

    suite: str
    device: str
    task: dict[str, Any]
    model: dict[str, Any]
    variant: AttentionChoice
    train: dict[str, Any]
    eval: dict[str, Any]
    eval_variants: tuple[AttentionChoice, ...]

    def __hash__(self) -> int:
        return hash(self.key(""))

    def config_dict(self) -> dict[str, Any]:
        """The canonical JSON-able configuration (what the key hashes)."""
        return jsonable(
            {
                SUITE: self.suite,
                DEVICE: self.device,
                TASK: self.task,
                "model": self.model,
                VARIANT: self.variant.as_dict(),
                "train": self.train,
                "eval": self.eval,
                "eval_variants": [e.as_dict() for e in self.eval_variants],
            }
        )

    def key(self, code_version: str) -> str:
        """Identity of (configuration, code version): first 16 hex of a sha256 (the `train_key`)."""
        payload = canonical_json({"config": self.config_dict(), CODE_VERSION: code_version})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def seq_len(self) -> int | None:
        """Sequence length when the task fixes it (images: known only once the data is read)."""
        if SEQ_LEN in self.task:
            return int(self.task[SEQ_LEN])
        size = self.task.get("image_size") or (8 if self.task.get("path") is None else None)
        return 3 * size * size if size else None

    def to_row(self) -> dict[str, Any]:
        """Flat configuration columns shared by every row of this cell."""
        row: dict[str, Any] = {
            KIND: KIND_QUALITY,
            TASK: self.task["name"],
            TASK_PARAMS: canonical_json(self.task),
            DEVICE: self.device,
            SEQ_LEN: self.seq_len,
        }
        row.update(jsonable(self.model))
        row.update(
            {
                VARIANT: self.variant.name,
                VARIANT_LABEL: self.variant.label,
                TRAIN_VARIANT: self.variant.label,
                VARIANT_PARAMS: canonical_json(self.variant.params),
            }
        )
        for name, value in jsonable(self.variant.params).items():
            column = name if name not in row else VARIANT_PARAM_PREFIX + name
            row.setdefault(column, value)
        train = {k: v for k, v in self.train.items() if k not in ("timeout_s",)}
        row.update(
            {
                TRAIN_STEPS: train["steps"],
                BATCH_SIZE: train[BATCH_SIZE],
                GRAD_ACCUM: train[GRAD_ACCUM],
                PEAK_LR: train[LR],
                SCHEDULE: train[SCHEDULE],
                SEED: train[SEED],
                TRAIN_CONFIG: canonical_json(train),
                ROW_TYPE: TRAIN_ROW,  # the cell's own row; its curve and eval rows say CURVE_ROW / EVAL_ROW
            }
        )
        return row

    # The cell protocol (harness.cells.Cell).

    def group_key(self) -> str:
        """Its own configuration key: a training cell is a group of one (nothing is skipped after it fails)."""
        return self.key("")

    def describe(self) -> str:
        """ "<label> (<task> L=<len> d_model=<d> layers=<n> <residual>, <steps> steps x <batch>)"."""
        m = self.model
        return (
            f"{self.variant.label:<16} ({self.task['name']} L={self.seq_len} d_model={m[D_MODEL]} layers={m[N_LAYERS]} "
            f"{m[RESIDUAL]}, {self.train['steps']} steps x {self.train[BATCH_SIZE]})"
        )

    def estimate_seconds(self) -> float:
        """`estimate_seconds(self)`: analytic FLOPs of training and evaluations (seconds)."""
        return estimate_seconds(self)

    def timeout_s(self) -> float:
        """The suite's `train.timeout_s` (seconds, evaluations included)."""
        return float(self.train["timeout_s"])

    def memory_limit_bytes(self) -> int | None:
        """`isolation.default_memory_limit_bytes()` on CPU (bytes above the process's baseline); None on CUDA."""
        return None if self.device.startswith("cuda") else default_memory_limit_bytes()

    def skip_after_failure(self) -> bool:
        return False

    def with_threads(self, threads: int) -> QualityCell:
        """This cell trained with `threads` torch CPU threads."""
        return dataclasses.replace(self, train={**self.train, THREADS: threads})

    def execute(
        self, root: str, suite: str, run_id: str, code_version: str, limit_memory: bool, report_baseline: Callable[[int], None] | None
    ) -> dict[str, Any]:
        """`train_cell` into the run folder root/suite/run_id; the columns of the cell's `train` row:
        status, rows written, the final step and the evaluation with its own attention."""
        if limit_memory and not self.device.startswith("cuda"):
            start_memory_limit(default_memory_limit_bytes(), report_baseline)
        try:
            rows = train_cell(self, RunStore(root, suite, run_id), code_version)
        except Exception as error:  # noqa: BLE001 - every failure becomes the cell's row
            message = f"{type(error).__name__}: {error}\n" + "".join(traceback.format_exception(error)[-3:])
            return {STATUS: STATUS_OOM if is_oom_error(error) else STATUS_ERROR, MESSAGE: message[:4000]}
        own = next((r for r in rows if r[EVAL_VARIANT] == self.variant.label), rows[0])
        return {
            STATUS: STATUS_OK,
            MESSAGE: "",
            ROWS_WRITTEN: len(rows),
            STEP: own[STEP],
            TRAIN_WALL_S: own[TRAIN_WALL_S],
            FINAL_EVAL_BPD: own[EVAL_BPD],
            FINAL_ACCURACY: own[ACCURACY],
        }

    def progress_text(self, row: dict[str, Any]) -> str:
        """ "ok <steps> steps, eval <bpd> bpd (<accuracy>%) with its own attention"."""
        accuracy = row.get(FINAL_ACCURACY)
        shown = f", accuracy {accuracy:5.1f}%" if isinstance(accuracy, float) and not math.isnan(accuracy) else ""
        return f"ok  {row.get(STEP)} steps, eval {row.get(FINAL_EVAL_BPD, math.nan):6.3f} bpd{shown} with its own attention"


# --------------------------------------------------------------------------- estimates


def estimate_seconds(cell: QualityCell) -> float:
    """Rough a-priori wall time: analytic FLOPs of training (3x forward) and evaluations at the
    round throughputs of harness.cells (50 GFLOP/s CPU, 100 TFLOP/s CUDA), plus process start.
    LSH's sorting and gathers are not counted: expect to be off by 3x or more."""
    m, t, e = cell.model, cell.train, cell.eval
    length = cell.seq_len or 1024
    d, layers = m[D_MODEL], m[N_LAYERS]

    def forward(choice: AttentionChoice, batch: int) -> float:
        params = {k: v for k, (_, v) in variant_fields(choice.name).items()} | choice.params
        span = min(length, 2 * int(params["bucket_size"])) * int(params["n_hashes"]) if "n_hashes" in params else length
        block = 8 * batch * length * d * d + 4 * batch * length * span * d + 4 * batch * length * d * m[D_FF]
        return layers * block + 2 * batch * length * d * m[VOCAB_SIZE]

    points = t["steps"] // t["eval_every"] + 2
    flops = 3 * forward(cell.variant, t[BATCH_SIZE]) * t["steps"] * t[GRAD_ACCUM]
    flops += forward(cell.variant, e[BATCH_SIZE]) * e["batches"] * points
    flops += sum(forward(c, e[BATCH_SIZE]) * e["batches"] for c in cell.eval_variants)
    return PROCESS_START_S + flops / (CUDA_FLOP_S if cell.device == "cuda" else CPU_FLOP_S)


# --------------------------------------------------------------------------- running one cell


def curve_row_key(train_key: str, step: int) -> str:
    return f"{train_key}-step{step:08d}"


def eval_row_key(train_key: str, choice: AttentionChoice) -> str:
    digest = hashlib.sha256(canonical_json(choice.as_dict()).encode()).hexdigest()[:8]
    return f"{train_key}-eval-{digest}"


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def train_cell(cell: QualityCell, store: RunStore, code_version: str, verbose: bool = True) -> list[dict[str, Any]]:
    """Train one cell in this process, writing curve rows as they come and then one eval row per
    eval variant to `store`; returns the eval rows. Resumes from the cell's checkpoint if present."""
    import torch

    from harness.data import build_data
    from harness.environment import apply_float32_matmul_precision, device_name, optional_package_versions
    from harness.training import EvalConfig, TrainConfig, build_model, evaluate, slim_checkpoint, train, with_attention

    if cell.train.get(THREADS):
        torch.set_num_threads(int(cell.train[THREADS]))
    device = torch.device(cell.device)
    key = cell.key(code_version)
    data = build_data(cell.task)
    model_settings = dict(cell.model)
    default_len = ReformerLMConfig.max_seq_len
    if model_settings[MAX_SEQ_LEN] < data.seq_len or (cell.seq_len is None and model_settings[MAX_SEQ_LEN] == default_len):
        model_settings[MAX_SEQ_LEN] = data.seq_len  # images read from a file: the length is known only now
    numerics = apply_float32_matmul_precision(cell.train.get(FLOAT32_MATMUL_PRECISION))
    train_settings = {k: v for k, v in cell.train.items() if k not in (THREADS, "timeout_s", FLOAT32_MATMUL_PRECISION)}
    train_settings["betas"] = tuple(train_settings["betas"])
    config = TrainConfig(**train_settings)
    eval_config = EvalConfig(**cell.eval)
    model = build_model(model_settings, cell.variant.name, cell.variant.params, seed=config.seed)
    common = {
        **cell.to_row(),
        SEQ_LEN: data.seq_len,
        CODE_VERSION: code_version,
        TRAIN_KEY: key,
        DEVICE_NAME: device_name(cell.device),
        THREADS: torch.get_num_threads(),
        N_PARAMS: sum(p.numel() for p in model.parameters()),
        **numerics,  # the float32 matmul precision, TF32 and determinism the cell trained with
        OPTIONAL_PACKAGES: canonical_json(optional_package_versions(imported_only=True)),  # what building the model imported
    }
    label = cell.variant.label

    def record(point: dict[str, Any]) -> None:
        store.append(
            {
                **common,
                ROW_TYPE: CURVE_ROW,
                CELL_KEY: curve_row_key(key, point[STEP]),
                STATUS: STATUS_OK,
                MESSAGE: "",
                RECORDED_AT: _stamp(),
                **point,
            }
        )
        if verbose:
            accuracy = f" acc {point[EVAL_ACCURACY]:5.1f}%" if not math.isnan(point[EVAL_ACCURACY]) else ""
            print(
                f"  {label:<16} step {point[STEP]:>6}  train {point[TRAIN_BPD]:6.3f}  eval {point[EVAL_BPD]:6.3f} bpd"
                f"{accuracy}  {point[WALL_S]:7.1f} s",
                flush=True,
            )

    checkpoint = store.path / "checkpoints" / f"{key}.pt"
    curve = train(model, data, config, eval_config, device=device, checkpoint=checkpoint, record=record)
    last = curve[-1]
    rows = []
    for choice in cell.eval_variants:
        started = time.perf_counter()
        evaluated = model if choice == cell.variant else with_attention(model, choice.name, choice.params)
        metrics = evaluate(evaluated, data, eval_config, device)
        row = {
            **common,
            ROW_TYPE: EVAL_ROW,
            CELL_KEY: eval_row_key(key, choice),
            STATUS: STATUS_OK,
            MESSAGE: "",
            RECORDED_AT: _stamp(),
            STEP: last[STEP],
            TOKENS_SEEN: last[TOKENS_SEEN],
            TRAIN_WALL_S: last[WALL_S],
            EVAL_VARIANT: choice.label,
            EVAL_VARIANT_NAME: choice.name,
            EVAL_VARIANT_PARAMS: canonical_json(choice.params),
            EVAL_BPD: metrics[BPD],
            ACCURACY: metrics[ACCURACY],
            EVAL_SYMBOLS: metrics["symbols"],
            EVAL_WALL_S: time.perf_counter() - started,
        }
        store.append(row)
        rows.append(row)
        if verbose:
            accuracy = f"  accuracy {row[ACCURACY]:5.1f}%" if not math.isnan(row[ACCURACY]) else ""
            print(f"  {label:<16} evaluated with {choice.label:<16} {row[EVAL_BPD]:6.3f} bpd{accuracy}", flush=True)
    slim_checkpoint(checkpoint)  # the cell is done: keep the weights, drop AdamW's moments
    return rows
