"""Which columns of a run vary, and the series (line) every row belongs to.

A run's rows are cells; the numeric configuration columns that vary (`sweep_axes`) are the x axes
of its tables and figures, and every other configuration column that varies names a separate line
beside the variant label (`series_label`). Nothing here knows suite or variant names.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pandas as pd

from harness.safe_io import parse_json
from harness.store.schema import (
    BATCH,
    D_FF,
    FFN_CHUNKS,
    N_LAYERS,
    RESIDUAL,
    SEQ_LEN,
    TOKENS_PER_BATCH,
    VARIANT,
    VARIANT_LABEL,
    VARIANT_PARAMS,
)

# Numeric sweep columns that can be an x axis, in order of preference for the summary tables.
X_CANDIDATES = (SEQ_LEN, N_LAYERS, FFN_CHUNKS, D_FF)
# Config columns that, when they vary within a suite, name separate lines beside the variant label.
SERIES_COLUMNS = (RESIDUAL, FFN_CHUNKS, D_FF, N_LAYERS)


def varies(rows: pd.DataFrame, column: str) -> bool:
    """Whether `column` exists and holds more than one distinct value (compared as text)."""
    return column in rows and rows[column].astype(str).nunique() > 1


def first_value(rows: pd.DataFrame, column: str) -> Any:
    """The first non-null value of `column`, or None (no such column, or all null)."""
    values = rows[column].dropna().unique() if column in rows else []
    return values[0] if len(values) else None


def tokens_per_step(rows: pd.DataFrame) -> int | None:
    """The constant tokens per step of the run (`tokens_per_batch`), or None when not constant."""
    if TOKENS_PER_BATCH not in rows or rows[TOKENS_PER_BATCH].isna().any():
        return None
    values = rows[TOKENS_PER_BATCH].unique()
    return int(values[0]) if len(values) == 1 else None


def sweep_axes(rows: pd.DataFrame) -> list[str]:
    """The numeric configuration columns that vary, each one x axis (`d_ff` only without ffn_chunks)."""
    axes = [c for c in X_CANDIDATES if c in rows and pd.to_numeric(rows[c], errors="coerce").nunique() > 1]
    if FFN_CHUNKS in axes and D_FF in axes:
        axes.remove(D_FF)  # one line per d_ff in the ffn_chunks figure
    return axes


def is_log_axis(values: Iterable[Any]) -> bool:
    """Log base 2 for sweeps of powers of two spanning at least 4x (1K..32K tokens, 1/4/16 chunks)."""
    numbers = [float(v) for v in values if v is not None and not pd.isna(v)]
    if len(set(numbers)) < 2 or min(numbers) <= 0:
        return False
    powers = all(float(v).is_integer() and (int(v) & (int(v) - 1)) == 0 for v in numbers)
    return powers and max(numbers) / min(numbers) >= 4


def primary_axis(rows: pd.DataFrame) -> str:
    """The first of `sweep_axes`, or seq_len when nothing varies."""
    axes = sweep_axes(rows)
    return axes[0] if axes else SEQ_LEN


def series_label(rows: pd.DataFrame, x: str = SEQ_LEN) -> pd.Series:
    """A per-row line name: the variant label plus every config column (but the x axis `x`) that varies."""
    label = rows[VARIANT_LABEL].astype(str)
    for column in SERIES_COLUMNS:
        if column != x and column in rows and rows[column].nunique(dropna=False) > 1:
            label = label + f" {column}=" + rows[column].astype(str)
    return label


def with_series(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """`rows` plus a `series` column: `series_label` for axis `x`, plus seq_len (and batch when it is
    not derived from tokens_per_batch) when they vary but are not the axis."""
    label = series_label(rows, x=x)
    for column in (SEQ_LEN, BATCH):
        derived = column == BATCH and TOKENS_PER_BATCH in rows and rows[TOKENS_PER_BATCH].notna().any()
        if column != x and not derived and varies(rows, column):
            label = label + f" {column}=" + rows[column].astype(str)
    return rows.assign(series=label)


def variant_params(value: Any) -> dict:
    """A row's `variant_params` (a dict, or its JSON text) as a dict; {} when missing or unreadable."""
    if isinstance(value, dict):
        return value
    try:
        parsed = parse_json(value) if isinstance(value, str) else {}
    except ValueError:  # InputFileError: not JSON, nested too deep
        return {}
    return parsed if isinstance(parsed, dict) else {}


def constant_variant_params(rows: pd.DataFrame) -> dict[str, dict]:
    """Per variant name, the parameters that are the same in all its rows (e.g. lsh: bucket_size=64)."""
    out: dict[str, dict] = {}
    for variant, part in rows.groupby(VARIANT, sort=False):
        dicts = [variant_params(v) for v in part[VARIANT_PARAMS]] if VARIANT_PARAMS in part else [{}]
        keys = set().union(*dicts)
        out[str(variant)] = {
            k: dicts[0].get(k) for k in sorted(keys) if all(k in d for d in dicts) and len({json.dumps(d[k]) for d in dicts}) == 1
        }
    return out
