"""CSV export: the run's tidy tables, one header line each, the way pandas users read them back.

    <dest>/<suite>/<run_id>/rows.csv     one row per cell (benchmark cells, or a quality run's
                                         train and eval rows), every column of the run's rows
    <dest>/<suite>/<run_id>/curves.csv   a quality run's learning-curve rows (one per step and cell)

Lists and mappings are written as JSON text; `pd.read_csv(path)` reads each file back.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.export import run_names, scalar
from harness.store.files import atomic_write_text
from harness.store.reader import StoredRun
from harness.store.schema import CURVE_ROW, ROUND_ROW, split

ROWS_FILE = "rows.csv"
CURVES_FILE = "curves.csv"


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with list / array / mapping values as JSON text and the columns no row fills dropped."""
    out = frame.dropna(axis=1, how="all").copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = [scalar(v) for v in out[column]]
    return out.reset_index(drop=True)


def export_csv(run: StoredRun, dest: Path) -> Path:
    """Write rows.csv (and curves.csv for a quality run) under dest/<suite>/<run_id>/; returns that folder."""
    suite, run_id = run_names(run)
    folder = dest / suite / run_id
    folder.mkdir(parents=True, exist_ok=True)
    parts = split(run.rows)
    curves = parts.curves
    atomic_write_text(folder / ROWS_FILE, tidy(parts.frame[~parts.kinds.isin((ROUND_ROW, CURVE_ROW))]).to_csv(index=False))
    if not curves.empty:
        atomic_write_text(folder / CURVES_FILE, tidy(curves).to_csv(index=False))
    return folder
