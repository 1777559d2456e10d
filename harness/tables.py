"""Pivoted summary tables of result rows: variants as rows, sequence lengths as columns."""

from __future__ import annotations

import pandas as pd

# Config columns that, when they vary within a suite, name separate lines beside the variant label.
SERIES_COLUMNS = ("residual", "ffn_chunks", "d_ff", "n_layers")


def series_label(rows: pd.DataFrame, x: str = "seq_len") -> pd.Series:
    """A per-row line name: the variant label plus every config column (but the x axis `x`) that varies."""
    label = rows["variant_label"].astype(str)
    for column in SERIES_COLUMNS:
        if column != x and column in rows and rows[column].nunique(dropna=False) > 1:
            label = label + f" {column}=" + rows[column].astype(str)
    return label


def pivot_metric(rows: pd.DataFrame, metric: str, columns: str = "seq_len", fmt: str = "{:.4g}") -> pd.DataFrame:
    """Table of `metric` with one row per series and one column per value of `columns`.

    Cells that did not finish show their status (OOM, TIMEOUT, ERROR, SKIPPED) instead of a number.
    """
    frame = rows.assign(series=series_label(rows, x=columns))

    def show(row: pd.Series) -> str:
        if row["status"] != "ok":
            return str(row["status"]).upper()
        value = row.get(metric)
        return "" if value is None or pd.isna(value) else fmt.format(value)

    frame = frame.assign(shown=frame.apply(show, axis=1))
    order = list(dict.fromkeys(frame["series"]))
    table = frame.pivot_table(index="series", columns=columns, values="shown", aggfunc="last")
    return table.reindex(order).fillna("")
