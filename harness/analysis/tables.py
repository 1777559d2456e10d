"""Summary tables of result rows: benchmark metrics pivoted (series as rows, the sweep axis as
columns), contended cells marked, and a quality run's accuracy and bits-per-dim grids."""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

from harness.analysis.series import series_label
from harness.store.schema import (
    ACCURACY,
    CONTENDED,
    CURVE_ROW,
    EVAL_ACCURACY,
    EVAL_BPD,
    EVAL_ROW,
    EVAL_VARIANT,
    N_LAYERS,
    RESIDUAL,
    ROW_TYPE,
    SEED,
    SEQ_LEN,
    STATUS,
    STATUS_OK,
    STEP,
    TASK,
    TRAIN_BPD,
    TRAIN_KEY,
    TRAIN_VARIANT,
    WALL_S,
)

CONTENDED_MARK = "*"  # after a timing whose cell stayed contended (`contended`), in the tables of times


def row_contended(row: dict[str, Any]) -> bool:
    """Whether one result row's timing stayed contended (`contended` true: Python or numpy bool)."""
    value = row.get(CONTENDED)
    return value is True or (type(value).__name__ == "bool_" and bool(value))


def is_contended(rows: pd.DataFrame) -> pd.Series:
    """Per row: whether its timing stayed contended (`contended` true; False where the column is missing)."""
    if CONTENDED not in rows:
        return pd.Series(False, index=rows.index)
    return rows[CONTENDED].astype(object).eq(True)


def pivot_metric(
    rows: pd.DataFrame, metric: str, columns: str = SEQ_LEN, fmt: str = "{:.4g}", mark_contended: bool = False
) -> pd.DataFrame:
    """Table of `metric` with one row per series and one column per value of `columns`.

    Cells that did not finish show their status (OOM, TIMEOUT, ERROR, SKIPPED) instead of a number;
    with `mark_contended` (tables of times), a contended cell's value ends in CONTENDED_MARK.
    """
    frame = rows.assign(series=series_label(rows, x=columns), _contended=is_contended(rows))

    def show(row: pd.Series) -> str:
        if row[STATUS] != STATUS_OK:
            return str(row[STATUS]).upper()
        value = row.get(metric)
        if value is None or pd.isna(value):
            return ""
        return fmt.format(value) + (CONTENDED_MARK if mark_contended and row["_contended"] else "")

    frame = frame.assign(shown=frame.apply(show, axis=1))
    order = list(dict.fromkeys(frame["series"]))
    table = frame.pivot_table(index="series", columns=columns, values="shown", aggfunc="last")
    return table.reindex(order).fillna("")


# --------------------------------------------------------------------------- quality runs


def accuracy_table(rows: Any) -> pd.DataFrame:
    """Train variant x eval variant table of `accuracy` (percent) from eval rows (a DataFrame),
    rows and columns in first-seen order."""
    frame = pd.DataFrame(rows)
    evals = frame[(frame.get(ROW_TYPE) == EVAL_ROW) & (frame[STATUS] == STATUS_OK)] if ROW_TYPE in frame else frame.iloc[0:0]
    if evals.empty:
        return pd.DataFrame()
    table = evals.pivot_table(index=TRAIN_VARIANT, columns=EVAL_VARIANT, values=ACCURACY, aggfunc="mean", sort=False)
    return table.reindex(index=list(dict.fromkeys(evals[TRAIN_VARIANT])), columns=list(dict.fromkeys(evals[EVAL_VARIANT])))


class SummaryTable(NamedTuple):
    """A titled table; `index`: whether the frame's index is part of what is shown."""

    title: str
    frame: pd.DataFrame
    index: bool = True


def quality_summary_tables(rows: list[dict[str, Any]] | pd.DataFrame) -> list[SummaryTable]:
    """The tables printed after a quality run: accuracy grid (percent), final eval bits per dim (per
    cell, or train x eval), last learning-curve point per training cell."""
    frame = pd.DataFrame(rows)
    if frame.empty or ROW_TYPE not in frame:
        return []
    out = []
    evals = frame[(frame[ROW_TYPE] == EVAL_ROW) & (frame[STATUS] == STATUS_OK)]
    group = [c for c in (N_LAYERS, RESIDUAL, SEED) if c in evals and evals[c].nunique() > 1]
    has_accuracy = ACCURACY in evals and evals[ACCURACY].notna().any()  # duplication task only
    if not evals.empty:
        if has_accuracy and not (evals[EVAL_VARIANT] == evals[TRAIN_VARIANT]).all():
            out.append(
                SummaryTable(
                    "accuracy (%) of the second-half predictions, trained with (rows) x evaluated with (columns)"
                    if evals[TASK].iloc[0] == "duplication"
                    else "accuracy (%), train x eval",
                    evals.pivot_table(index=[TRAIN_VARIANT, *group], columns=EVAL_VARIANT, values=ACCURACY, sort=False).round(1),
                )
            )
        if (evals[EVAL_VARIANT] == evals[TRAIN_VARIANT]).all():  # no eval_variants: one number per cell
            columns = [TRAIN_VARIANT, *group, EVAL_BPD] + ([ACCURACY] if has_accuracy else [])
            out.append(SummaryTable("final eval bits per dim", evals[columns].round(3), index=False))
        else:
            out.append(
                SummaryTable(
                    "eval bits per dim, train x eval",
                    evals.pivot_table(index=[TRAIN_VARIANT, *group], columns=EVAL_VARIANT, values=EVAL_BPD, sort=False).round(3),
                )
            )
    curve = frame[frame[ROW_TYPE] == CURVE_ROW]
    if not curve.empty:
        last = curve.loc[curve.groupby(TRAIN_KEY, sort=False)[STEP].idxmax()]
        columns = [c for c in (TRAIN_VARIANT, *group, STEP, TRAIN_BPD, EVAL_BPD, EVAL_ACCURACY, WALL_S) if c in last]
        out.append(SummaryTable("last learning-curve point per training cell", last[columns].round(3), index=False))
    return out
