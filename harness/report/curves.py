"""The sections of a training (quality) run's report: learning curves and the train-by-eval grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.paper import CITATION, TABLE2, TABLE2_EVAL, table2_scale_note
from harness.analysis.series import with_series
from harness.report import figures
from harness.report.document import Block, Figure, Heading, Paragraph, Table
from harness.report.labels import legend_names, subtitle, what_was_measured
from harness.store.schema import ACCURACY, EVAL_ACCURACY, EVAL_BPD, EVAL_VARIANT, STEP, TRAIN_BPD


def training_sections(curve: pd.DataFrame, grid: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """Learning curves (bits per dim against step, mean over repeated rows such as seeds) and the
    train-by-eval table of accuracy (%, or eval bits per dim where no accuracy was scored)."""
    blocks: list[Block] = []
    measured = [c for c in (TRAIN_BPD, EVAL_BPD, EVAL_ACCURACY) if c in curve]
    if not curve.empty and {TRAIN_BPD, EVAL_BPD} & set(measured):
        frame = with_series(curve, STEP)
        title_name, names = legend_names(frame)
        means = frame.groupby(["series", STEP], sort=False)[measured].mean().reset_index()
        fig = figures.plot_bpd_curves(
            means,
            palette,
            title=f"Bits per dim during training ({what_was_measured(frame)})",
            subtitle=subtitle(frame, STEP),
            legend_title=title_name,
            names=names,
        )
        figures.save(fig, folder, "bpd_curves")
        last = means.sort_values(STEP).groupby("series", sort=False).tail(1).set_index("series")
        last = last.reindex([s for s in dict.fromkeys(frame["series"]) if s in last.index])
        blocks += [
            Heading(level=2, text="Learning curves"),
            Figure("bpd_curves", "Bits per dim (bits per byte/symbol) against training step: train solid, eval dashed."),
            Paragraph("Last logged step per series:"),
            Table(last[[STEP, *measured]]),
        ]
    if not grid.empty and EVAL_VARIANT in grid:
        frame = with_series(grid, STEP)
        scored = ACCURACY in frame and frame[ACCURACY].notna().any()
        value = ACCURACY if scored else EVAL_BPD
        if value not in frame:
            return blocks
        table = frame.pivot_table(index="series", columns=EVAL_VARIANT, values=value, aggfunc="mean", sort=False)
        table = table.reindex(index=list(dict.fromkeys(frame["series"])), columns=list(dict.fromkeys(frame[EVAL_VARIANT])))
        table.index.name, table.columns.name = "trained with", "evaluated with"
        shown = table.map(lambda v: "" if pd.isna(v) else (f"{v:.1f}" if scored else f"{v:.3f}"))
        blocks.append(Heading(level=2, text="Train-by-eval " + ("accuracy (%)" if scored else "bits per dim")))
        if scored:
            fig = figures.plot_accuracy_grid(table, title="Accuracy (%): trained with (rows) x evaluated with (columns)")
            figures.save(fig, folder, "train_eval_accuracy")
            blocks.append(Figure("train_eval_accuracy", "Accuracy (%) by training (rows) and evaluation (columns) variant."))
        blocks.append(Table(shown))
        if scored:
            reference = pd.DataFrame(TABLE2, index=TABLE2_EVAL).T
            reference.index.name, reference.columns.name = "trained with", "evaluated with"
            blocks += [
                Paragraph(f"For reference, the paper's Table 2 (duplication task, 1 layer, accuracy %; {CITATION}):"),
                Table(reference),
            ]
            scale = table2_scale_note(frame)
            blocks += [Paragraph(scale)] if scale else []
    return blocks
