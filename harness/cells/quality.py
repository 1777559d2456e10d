"""Training cells (quality suites): one ReformerLM trained on a task, its learning curve in bits
per dim, then its final model evaluated with each of a list of attention configurations (paper
Table 2: a model trained with one attention, evaluated with others).

`QualityCell.execute` (in the cell's own process) trains, writing one `curve` row per eval point
into the run folder as it goes and a checkpoint to `<run>/checkpoints/<key>.pt` (so an interrupted
cell continues from it on `--resume`), then one `eval` row per evaluation; the sweep stores the
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

from harness.cells import CPU_FLOP_S, CUDA_FLOP_S, PROCESS_START_S, canonical_json, jsonable, variant_fields
from harness.isolation import default_memory_limit_bytes, start_memory_limit
from harness.measurement import is_oom_error
from harness.results import RunStore
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
                "suite": self.suite,
                "device": self.device,
                "task": self.task,
                "model": self.model,
                "variant": self.variant.as_dict(),
                "train": self.train,
                "eval": self.eval,
                "eval_variants": [e.as_dict() for e in self.eval_variants],
            }
        )

    def key(self, code_version: str) -> str:
        """Identity of (configuration, code version): first 16 hex of a sha256 (the `train_key`)."""
        payload = canonical_json({"config": self.config_dict(), "code_version": code_version})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def seq_len(self) -> int | None:
        """Sequence length when the task fixes it (images: known only once the data is read)."""
        if "seq_len" in self.task:
            return int(self.task["seq_len"])
        size = self.task.get("image_size") or (8 if self.task.get("path") is None else None)
        return 3 * size * size if size else None

    def to_row(self) -> dict[str, Any]:
        """Flat configuration columns shared by every row of this cell."""
        row: dict[str, Any] = {
            "kind": "quality",
            "task": self.task["name"],
            "task_params": canonical_json(self.task),
            "device": self.device,
            "seq_len": self.seq_len,
        }
        row.update(jsonable(self.model))
        row.update(
            variant=self.variant.name,
            variant_label=self.variant.label,
            train_variant=self.variant.label,
            variant_params=canonical_json(self.variant.params),
        )
        for name, value in jsonable(self.variant.params).items():
            column = name if name not in row else f"variant_{name}"
            row.setdefault(column, value)
        train = {k: v for k, v in self.train.items() if k not in ("timeout_s",)}
        row.update(
            train_steps=train["steps"],
            batch_size=train["batch_size"],
            grad_accum=train["grad_accum"],
            peak_lr=train["lr"],
            schedule=train["schedule"],
            seed=train["seed"],
            train_config=canonical_json(train),
            row_type="train",  # the cell's own row; its curve and eval rows say "curve" / "eval"
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
            f"{self.variant.label:<16} ({self.task['name']} L={self.seq_len} d_model={m['d_model']} layers={m['n_layers']} "
            f"{m['residual']}, {self.train['steps']} steps x {self.train['batch_size']})"
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
        return dataclasses.replace(self, train={**self.train, "threads": threads})

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
            return {"status": "oom" if is_oom_error(error) else "error", "message": message[:4000]}
        own = next((r for r in rows if r["eval_variant"] == self.variant.label), rows[0])
        return {
            "status": "ok",
            "message": "",
            "rows_written": len(rows),
            "step": own["step"],
            "train_wall_s": own["train_wall_s"],
            "final_eval_bpd": own["eval_bpd"],
            "final_accuracy": own["accuracy"],
        }

    def progress_text(self, row: dict[str, Any]) -> str:
        """ "ok <steps> steps, eval <bpd> bpd (<accuracy>%) with its own attention"."""
        accuracy = row.get("final_accuracy")
        shown = f", accuracy {accuracy:5.1f}%" if isinstance(accuracy, float) and not math.isnan(accuracy) else ""
        return f"ok  {row.get('step')} steps, eval {row.get('final_eval_bpd', math.nan):6.3f} bpd{shown} with its own attention"


# --------------------------------------------------------------------------- estimates


def estimate_seconds(cell: QualityCell) -> float:
    """Rough a-priori wall time: analytic FLOPs of training (3x forward) and evaluations at the
    round throughputs of harness.cells (50 GFLOP/s CPU, 100 TFLOP/s CUDA), plus process start.
    LSH's sorting and gathers are not counted: expect to be off by 3x or more."""
    m, t, e = cell.model, cell.train, cell.eval
    length = cell.seq_len or 1024
    d, layers = m["d_model"], m["n_layers"]

    def forward(choice: AttentionChoice, batch: int) -> float:
        params = {k: v for k, (_, v) in variant_fields(choice.name).items()} | choice.params
        span = min(length, 2 * int(params["bucket_size"])) * int(params["n_hashes"]) if "n_hashes" in params else length
        block = 8 * batch * length * d * d + 4 * batch * length * span * d + 4 * batch * length * d * m["d_ff"]
        return layers * block + 2 * batch * length * d * m["vocab_size"]

    points = t["steps"] // t["eval_every"] + 2
    flops = 3 * forward(cell.variant, t["batch_size"]) * t["steps"] * t["grad_accum"]
    flops += forward(cell.variant, e["batch_size"]) * e["batches"] * points
    flops += sum(forward(c, e["batch_size"]) * e["batches"] for c in cell.eval_variants)
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
    from harness.store.schema import OPTIONAL_PACKAGES as OPTIONAL_PACKAGES_COLUMN
    from harness.training import EvalConfig, TrainConfig, build_model, evaluate, slim_checkpoint, train, with_attention

    if cell.train.get("threads"):
        torch.set_num_threads(int(cell.train["threads"]))
    device = torch.device(cell.device)
    key = cell.key(code_version)
    data = build_data(cell.task)
    model_settings = dict(cell.model)
    default_len = ReformerLMConfig.max_seq_len
    if model_settings["max_seq_len"] < data.seq_len or (cell.seq_len is None and model_settings["max_seq_len"] == default_len):
        model_settings["max_seq_len"] = data.seq_len  # images read from a file: the length is known only now
    numerics = apply_float32_matmul_precision(cell.train.get("float32_matmul_precision"))
    train_settings = {k: v for k, v in cell.train.items() if k not in ("threads", "timeout_s", "float32_matmul_precision")}
    train_settings["betas"] = tuple(train_settings["betas"])
    config = TrainConfig(**train_settings)
    eval_config = EvalConfig(**cell.eval)
    model = build_model(model_settings, cell.variant.name, cell.variant.params, seed=config.seed)
    common = {
        **cell.to_row(),
        "seq_len": data.seq_len,
        "code_version": code_version,
        "train_key": key,
        "device_name": device_name(cell.device),
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in model.parameters()),
        **numerics,  # the float32 matmul precision, TF32 and determinism the cell trained with
        OPTIONAL_PACKAGES_COLUMN: canonical_json(optional_package_versions(imported_only=True)),  # what building the model imported
    }
    label = cell.variant.label

    def record(point: dict[str, Any]) -> None:
        store.append(
            {
                **common,
                "row_type": "curve",
                "cell_key": curve_row_key(key, point["step"]),
                "status": "ok",
                "message": "",
                "recorded_at": _stamp(),
                **point,
            }
        )
        if verbose:
            accuracy = f" acc {point['eval_accuracy']:5.1f}%" if not math.isnan(point["eval_accuracy"]) else ""
            print(
                f"  {label:<16} step {point['step']:>6}  train {point['train_bpd']:6.3f}  eval {point['eval_bpd']:6.3f} bpd"
                f"{accuracy}  {point['wall_s']:7.1f} s",
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
            "row_type": "eval",
            "cell_key": eval_row_key(key, choice),
            "status": "ok",
            "message": "",
            "recorded_at": _stamp(),
            "step": last["step"],
            "tokens_seen": last["tokens_seen"],
            "train_wall_s": last["wall_s"],
            "eval_variant": choice.label,
            "eval_variant_name": choice.name,
            "eval_variant_params": canonical_json(choice.params),
            "eval_bpd": metrics["bpd"],
            "accuracy": metrics["accuracy"],
            "eval_symbols": metrics["symbols"],
            "eval_wall_s": time.perf_counter() - started,
        }
        store.append(row)
        rows.append(row)
        if verbose:
            accuracy = f"  accuracy {row['accuracy']:5.1f}%" if not math.isnan(row["accuracy"]) else ""
            print(f"  {label:<16} evaluated with {choice.label:<16} {row['eval_bpd']:6.3f} bpd{accuracy}", flush=True)
    slim_checkpoint(checkpoint)  # the cell is done: keep the weights, drop AdamW's moments
    return rows
