"""TensorBoard export: event files written with `torch.utils.tensorboard.SummaryWriter`.

    <dest>/<suite>/<run_id>/<cell>/events.out.tfevents.*     one run directory per cell

A quality cell's curve columns are scalars over training steps (`train_bpd`, `eval_bpd`, ...), its
evaluations `eval/<variant>/bpd` at the last step; a benchmark series' metrics (`time_ms_median`,
`peak_mem_mib`, ...) are scalars whose step is seq_len. The configuration is a text summary
(`config`) and TensorBoard hparams. Exporting again replaces the cell's earlier event files, so
nothing is shown twice. Open with `tensorboard --logdir <dest>`.
"""

from __future__ import annotations

from pathlib import Path

from harness.export import ExportCell, export_cells, missing_package, run_names
from harness.store.reader import StoredRun
from harness.store.schema import CODE_VERSION, DEVICE

EVENT_PREFIX = "events.out.tfevents."


def _config_text(run: StoredRun, cell: ExportCell) -> str:
    lines = ["| key | value |", "|---|---|"]
    meta = {"run": f"{run.suite}/{run.run_id}", CODE_VERSION: run.code_version, DEVICE: run.device_name, "cell": cell.key}
    for key, value in {**meta, **cell.params}.items():
        lines.append(f"| {key} | {str(value).replace('|', '/')} |")
    return "\n".join(lines)


def _hparams(cell: ExportCell) -> dict:
    return {k: v for k, v in cell.params.items() if isinstance(v, (bool, int, float, str))}


def export_tensorboard(run: StoredRun, dest: Path) -> Path:
    """Write one event-file directory per cell under dest/<suite>/<run_id>/; returns that folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as error:
        raise missing_package("tensorboard", error) from None
    suite, run_id = run_names(run)
    folder = dest / suite / run_id
    for cell in export_cells(run):
        logdir = folder / cell.name
        if logdir.is_dir():
            for old in logdir.glob(EVENT_PREFIX + "*"):  # our own earlier export of this cell
                old.unlink()
        writer = SummaryWriter(log_dir=str(logdir))
        try:
            for metric, points in cell.metrics.items():
                for x, value, millis in points:
                    writer.add_scalar(metric, value, global_step=x, walltime=millis / 1000 if millis else None)
            writer.add_text("config", _config_text(run, cell))
            final = {f"hparams/{m}": points[-1][1] for m, points in cell.metrics.items() if points}
            for summary in hparams(_hparams(cell), final):
                writer.file_writer.add_summary(summary)
        finally:
            writer.close()
    return folder
