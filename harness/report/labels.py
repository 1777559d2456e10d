"""The words of a report: what a run measured, axis names, legend titles, subtitles, short tables."""

from __future__ import annotations

import textwrap
from typing import Iterable

import pandas as pd

from harness.analysis.series import constant_variant_params, first_value, tokens_per_step, varies, with_series
from harness.store.schema import (
    BATCH,
    CAUSAL,
    D_FF,
    D_MODEL,
    DEVICE,
    DEVICE_NAME,
    DTYPE,
    FFN_CHUNKS,
    MESSAGE,
    MODE,
    N_HEADS,
    N_LAYERS,
    RESIDUAL,
    SEQ_LEN,
    STATUS,
    STATUS_OK,
    STEP,
    TASK,
    VARIANT,
    VARIANT_LABEL,
    VOCAB_SIZE,
    WORKLOAD,
)

AXIS_TEXT = {
    SEQ_LEN: ("sequence length", "sequence length (tokens)"),
    N_LAYERS: ("number of layers", "number of layers"),
    FFN_CHUNKS: ("feed-forward chunks", "feed-forward chunks (along the sequence)"),
    D_FF: ("feed-forward width", "d_ff (feed-forward width)"),
}
WORKLOAD_TEXT = {"attention": "one attention layer", "block": "Reformer block", "model": "Reformer LM"}
MODE_TEXT = {"forward": "forward", "forward_backward": "forward + backward", "train_step": "training step"}
# Configuration columns worth naming in a subtitle, per workload (others are unused defaults).
SHOWN_CONFIG = {
    "attention": (D_MODEL, N_HEADS, CAUSAL),
    "block": (D_MODEL, N_HEADS, D_FF, N_LAYERS, RESIDUAL, FFN_CHUNKS, CAUSAL),
    "model": (VOCAB_SIZE, D_MODEL, N_HEADS, D_FF, N_LAYERS, RESIDUAL, FFN_CHUNKS, CAUSAL),
}


def legend_names(rows: pd.DataFrame) -> tuple[str, dict[str, str]]:
    """(legend title, series -> shown name) of rows with a `series` column. With one variant label the
    title names it and its fixed parameters and the entries show only what differs; otherwise the
    title is "variant"."""
    constant = constant_variant_params(rows)
    labels = rows[VARIANT_LABEL].astype(str).unique()
    if len(labels) == 1:
        variant = str(rows[VARIANT].iloc[0])
        params = ", ".join(f"{k}={v}" for k, v in constant.get(variant, {}).items() if f"{k}=" not in labels[0])
        title = f"{labels[0]} ({params})" if params else labels[0]
        names = {s: (s[len(labels[0]) :].strip() or s) for s in rows["series"].unique()}
        return title, names
    fixed = "; ".join(f"{v}: " + ", ".join(f"{k}={p}" for k, p in ps.items()) for v, ps in constant.items() if ps)
    return (f"variant ({fixed})" if fixed else VARIANT), {}


def fixed_settings(rows: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """ "key=value" of the configuration columns that are constant and matter for the workload."""
    workload = first_value(rows, WORKLOAD)
    columns = [SEQ_LEN, BATCH] + list(SHOWN_CONFIG.get(workload, SHOWN_CONFIG["model"]))
    out = []
    for column in columns:
        if column in exclude or column not in rows or varies(rows, column) or rows[column].isna().all():
            continue
        if column == BATCH and tokens_per_step(rows):
            continue
        out.append(f"{column}={first_value(rows, column)}")
    return out


def subtitle(rows: pd.DataFrame, x: str) -> str:
    """A figure's subtitle: tokens per step (along seq_len), device and dtype, the fixed settings."""
    tokens = tokens_per_step(rows)
    parts = [f"{tokens:,} tokens per step (batch = {tokens:,} / length)" if tokens and x == SEQ_LEN else ""]
    parts.append(" ".join(str(v) for v in (first_value(rows, DEVICE_NAME) or first_value(rows, DEVICE), first_value(rows, DTYPE)) if v))
    parts.append(", ".join(fixed_settings(rows, exclude=[x])))
    return "\n".join(textwrap.fill(p, 100) for p in parts if p)


def what_was_measured(rows: pd.DataFrame) -> str:
    """ "one attention layer, forward + backward"; "training on duplication" for quality rows."""
    workload, mode, task = first_value(rows, WORKLOAD), first_value(rows, MODE), first_value(rows, TASK)
    if workload is None and task is not None:
        return f"training on {task}"
    return ", ".join(str(t) for t in (WORKLOAD_TEXT.get(workload, workload), MODE_TEXT.get(mode, mode)) if t)


def short_message(messages: pd.Series) -> pd.Series:
    """Each message shortened to one line of at most 140 characters."""
    return messages.fillna("").astype(str).map(lambda m: textwrap.shorten(m, 140))


def failed_table(rows: pd.DataFrame, x: str | None = None) -> pd.DataFrame:
    """The rows that did not finish: series, `x` (when given), STATUS and the shortened message."""
    failed = with_series(rows[rows[STATUS] != STATUS_OK], x or STEP)
    message = short_message(failed[MESSAGE]) if MESSAGE in failed else ""
    columns = {
        "series": failed["series"],
        **({x: failed[x]} if x else {}),
        STATUS: failed[STATUS].astype(str).str.upper(),
        MESSAGE: message,
    }
    return pd.DataFrame(columns)
