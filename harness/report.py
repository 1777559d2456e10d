"""Reports from stored results: figures, `report.md` and a self-contained `index.html`.

`render_report(results, out)` reads run folders (nothing is re-run) and writes, per run,
`reports/<suite>/<run_id>/` (or `out`) with every figure as PNG and SVG, `report.md` and
`index.html` (the PNGs embedded as base64, the SVGs linked beside it). Which figures are drawn
follows from which configuration columns vary in the rows (`sweep_axes`), never from suite or
variant names:

- `seq_len` varies: time per step, peak memory and throughput against length (log-log), with the
  paper's Fig. 5 read-offs when the run is one attention layer at the paper's 32,768 tokens/step;
- `n_layers`, `ffn_chunks` (or `d_ff` alone) vary: peak memory and time against it;
- rows with `step` and `train_bpd`/`eval_bpd`: learning curves; rows with `train_variant`,
  `eval_variant` and `accuracy`: the train-by-eval accuracy table and heat map.

`render_compare(run_a, run_b, out)` matches the cells of two runs on their configuration columns
and reports the time ratio B/A per cell, marking differences within measurement noise.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from harness import figures, paper, stats
from harness.check import for_check, rules_for
from harness.overrides import overrides_text
from harness.safe_io import InputFileError, check_name, check_under, parse_json
from harness.store.files import RUN_INFO, ResultsError, atomic_write_text
from harness.store.reader import StoredRun, cell_rows, latest_run, load_run_info, read_run
from harness.tables import CONTENDED_MARK, is_contended, pivot_metric, series_label
from harness.targets import evaluate_targets

RESULTS_ROOT = Path("results")  # relative to the working directory, never to where the package lives


def reports_root(results_root: str | Path) -> Path:
    """Where reports go by default: `reports/` beside the results root (results/ -> reports/)."""
    return Path(results_root).parent / "reports"


# Numeric sweep columns that can be an x axis, in order of preference for the summary tables.
X_CANDIDATES = ("seq_len", "n_layers", "ffn_chunks", "d_ff")
AXIS_TEXT = {
    "seq_len": ("sequence length", "sequence length (tokens)"),
    "n_layers": ("number of layers", "number of layers"),
    "ffn_chunks": ("feed-forward chunks", "feed-forward chunks (along the sequence)"),
    "d_ff": ("feed-forward width", "d_ff (feed-forward width)"),
}
WORKLOAD_TEXT = {"attention": "one attention layer", "block": "Reformer block", "model": "Reformer LM"}
MODE_TEXT = {"forward": "forward", "forward_backward": "forward + backward", "train_step": "training step"}
# Configuration columns worth naming in a subtitle, per workload (others are unused defaults).
SHOWN_CONFIG = {
    "attention": ("d_model", "n_heads", "causal"),
    "block": ("d_model", "n_heads", "d_ff", "n_layers", "residual", "ffn_chunks", "causal"),
    "model": ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "residual", "ffn_chunks", "causal"),
}
REQUIRED_COLUMNS = ("status", "variant", "variant_label", "seq_len")
# Columns that identify a cell's configuration in `compare` (model columns are added from the schema).
MATCH_CORE = ("workload", "mode", "device", "dtype", "seq_len", "batch", "tokens_per_batch", "variant", "variant_params")
ALPHA = 0.01  # significance level of the noise check in `compare`


# --------------------------------------------------------------------------- loading


def open_run(arg: str | Path, root: str | Path = RESULTS_ROOT) -> StoredRun:
    """`results.read_run`, checked to have a run.json and to be a harness results table (REQUIRED_COLUMNS)."""
    run = read_run(arg, root)
    if not run.info:
        load_run_info(run.path)  # raises the clear "run.json: file not found"
    missing = [c for c in REQUIRED_COLUMNS if c not in run.rows.columns]
    if missing:
        raise ResultsError(f"{run.path}: results lack the column(s) {', '.join(missing)}; not a harness results table?")
    labels = run.rows["variant_label"]
    if labels.isna().any():  # a row without a label (a foreign or damaged file): named by its variant
        run.rows["variant_label"] = labels.where(labels.notna(), run.rows["variant"].where(run.rows["variant"].notna(), "?").astype(str))
    return run


def default_runs(root: str | Path = RESULTS_ROOT) -> list[Path]:
    """The latest run of every suite under `root`."""
    root = Path(root)
    suites = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(("_", "."))] if root.is_dir() else []
    runs = [latest_run(root, d.name) for d in suites]  # baselines/<device>/<name>/ holds no run folders itself
    runs = [r for r in runs if r is not None]
    if not runs:
        raise ResultsError(f"{root}: no runs found (run a suite first: python -m harness run suites/seq_length.yaml)")
    return runs


# --------------------------------------------------------------------------- analysis


def _split(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(benchmark rows, learning-curve rows, train-by-eval rows, failed training cells).

    Quality runs (harness.cells.quality) mark their rows with `row_type` "curve" / "eval" / "train";
    without that column, rows with an `eval_variant` are evaluations and rows with a `step` curves.
    Benchmark rows have neither; the rows of single rounds of a cell measured in rounds ("round")
    are left out (the cell's own row has them combined)."""
    rows = cell_rows(rows)
    if "row_type" in rows:
        kind = rows["row_type"].astype(object)
    else:
        kind = pd.Series(None, index=rows.index, dtype=object)
        if "step" in rows:
            kind = kind.mask(rows["step"].notna(), "curve")
        if "eval_variant" in rows:
            kind = kind.mask(rows["eval_variant"].notna(), "eval")
    other = kind.notna() & ~kind.isin(["curve", "eval"]) & (rows["status"] != "ok")  # failed `train` rows
    return rows[kind.isna()], rows[kind == "curve"], rows[kind == "eval"], rows[other]


def _varies(rows: pd.DataFrame, column: str) -> bool:
    return column in rows and rows[column].astype(str).nunique() > 1


def sweep_axes(rows: pd.DataFrame) -> list[str]:
    """The numeric configuration columns that vary, each one x axis (`d_ff` only without ffn_chunks)."""
    axes = [c for c in X_CANDIDATES if c in rows and pd.to_numeric(rows[c], errors="coerce").nunique() > 1]
    if "ffn_chunks" in axes and "d_ff" in axes:
        axes.remove("d_ff")  # one line per d_ff in the ffn_chunks figure
    return axes


def with_series(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """`rows` plus a `series` column: `tables.series_label` for axis `x`, plus seq_len (and batch when it
    is not derived from tokens_per_batch) when they vary but are not the axis."""
    label = series_label(rows, x=x)
    for column in ("seq_len", "batch"):
        derived = column == "batch" and "tokens_per_batch" in rows and rows["tokens_per_batch"].notna().any()
        if column != x and not derived and _varies(rows, column):
            label = label + f" {column}=" + rows[column].astype(str)
    return rows.assign(series=label)


def _first(rows: pd.DataFrame, column: str) -> Any:
    values = rows[column].dropna().unique() if column in rows else []
    return values[0] if len(values) else None


def _tokens_per_step(rows: pd.DataFrame) -> int | None:
    """The constant tokens per step of the run (tokens_per_batch), or None when not constant."""
    if "tokens_per_batch" not in rows or rows["tokens_per_batch"].isna().any():
        return None
    values = rows["tokens_per_batch"].unique()
    return int(values[0]) if len(values) == 1 else None


def _params(value: Any) -> dict:
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
    for variant, part in rows.groupby("variant", sort=False):
        dicts = [_params(v) for v in part["variant_params"]] if "variant_params" in part else [{}]
        keys = set().union(*dicts)
        out[str(variant)] = {
            k: dicts[0].get(k) for k in sorted(keys) if all(k in d for d in dicts) and len({json.dumps(d[k]) for d in dicts}) == 1
        }
    return out


def legend_names(rows: pd.DataFrame) -> tuple[str, dict[str, str]]:
    """(legend title, series -> shown name). With one variant label the title names it and its fixed
    parameters and the entries show only what differs; otherwise the title is "variant"."""
    constant = constant_variant_params(rows)
    labels = rows["variant_label"].astype(str).unique()
    if len(labels) == 1:
        variant = str(rows["variant"].iloc[0])
        params = ", ".join(f"{k}={v}" for k, v in constant.get(variant, {}).items() if f"{k}=" not in labels[0])
        title = f"{labels[0]} ({params})" if params else labels[0]
        names = {s: (s[len(labels[0]) :].strip() or s) for s in rows["series"].unique()}
        return title, names
    fixed = "; ".join(f"{v}: " + ", ".join(f"{k}={p}" for k, p in ps.items()) for v, ps in constant.items() if ps)
    return (f"variant ({fixed})" if fixed else "variant"), {}


def fixed_settings(rows: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """ "key=value" of the configuration columns that are constant and matter for the workload."""
    workload = _first(rows, "workload")
    columns = ["seq_len", "batch"] + list(SHOWN_CONFIG.get(workload, SHOWN_CONFIG["model"]))
    out = []
    for column in columns:
        if column in exclude or column not in rows or _varies(rows, column) or rows[column].isna().all():
            continue
        if column == "batch" and _tokens_per_step(rows):
            continue
        out.append(f"{column}={_first(rows, column)}")
    return out


def summary_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pivoted tables (series x primary axis) of median time (ms) and peak memory (MiB)."""
    axes = sweep_axes(rows)
    x = axes[0] if axes else "seq_len"
    return {
        f"median time per step (ms), by {x}": pivot_metric(rows, "time_ms_median", columns=x, mark_contended=True),
        f"peak memory (MiB), by {x}": pivot_metric(rows, "peak_mem_mib", columns=x, fmt="{:.1f}"),
    }


def scaling_fits(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per series, least-squares fits over ok cells of time and peak memory against `x`.

    On a power-of-two axis: exponents k of metric ~ x^k (fit on log-log). Otherwise: slopes
    (ms and MiB per unit of x). Series with fewer than two distinct x values are left out.
    """
    log = figures.is_log_axis(rows[x])
    frame = with_series(rows[rows["status"] == "ok"], x)
    out = []
    for series in dict.fromkeys(frame["series"]):  # the order of the summary tables
        part = frame[frame["series"] == series]
        xs = pd.to_numeric(part[x], errors="coerce").to_numpy(float)
        if len(set(xs[np.isfinite(xs)])) < 2:
            continue
        entry: dict[str, Any] = {"series": series, "cells": len(part), "range": f"{xs.min():g}..{xs.max():g}"}
        for name, column in (("time", "time_ms_median"), ("memory", "peak_mem_mib")):
            ys = pd.to_numeric(part[column], errors="coerce").to_numpy(float)
            keep = np.isfinite(xs) & np.isfinite(ys) & ((xs > 0) & (ys > 0) if log else True)
            if keep.sum() < 2 or len(set(xs[keep])) < 2:
                entry[name] = np.nan
                continue
            if log:
                entry[name] = float(np.polyfit(np.log(xs[keep]), np.log(ys[keep]), 1)[0])
            else:
                entry[name] = float(np.polyfit(xs[keep], ys[keep], 1)[0])
        out.append(entry)
    frame = pd.DataFrame(out)
    for column in ("time", "memory"):
        if column in frame:
            frame[column] = frame[column].round(3) + 0.0  # no "-0"
    return frame


def paper_fig5(rows: pd.DataFrame, palette: dict[str, Any]) -> tuple[list[tuple[paper.PaperSeries, Any]], pd.DataFrame | None, str]:
    """The paper's Fig. 5 lines to draw (with our colour of the matching series), the comparison
    table (paper vs this run at the read-off lengths, seconds per step) and a note.

    Lines are drawn only for one attention layer trained at the paper's 32,768 tokens per step; the
    table is given for any constant-tokens attention run (compare ratios when the tokens differ)."""
    tokens = _tokens_per_step(rows)
    if _first(rows, "workload") != "attention" or tokens is None or _first(rows, "mode") == "forward":
        return [], None, ""
    frame = with_series(rows, "seq_len")
    keys = frame.drop_duplicates("series")
    lines, table = [], []
    for entry in paper.FIG5:
        match = [r["series"] for _, r in keys.iterrows() if entry.matches(str(r["variant"]), _params(r["variant_params"]))]
        series = match[0] if match else None
        lines.append((entry, palette.get(series, (0.5, 0.5, 0.5))))
        (x0, y0), (x1, y1) = entry.points[0], entry.points[-1]
        mine, seconds = {}, {}
        for x_value in (x0, x1):
            cell = frame[(frame["series"] == series) & (frame["seq_len"] == x_value)] if series else frame.iloc[:0]
            if cell.empty:
                mine[x_value] = "-"
            elif cell["status"].iloc[0] != "ok":
                mine[x_value] = str(cell["status"].iloc[0]).upper()
            else:
                seconds[x_value] = float(cell["time_ms_median"].iloc[0]) / 1000
                mine[x_value] = f"{seconds[x_value]:.4g}"
        ratio = f"{seconds[x1] / seconds[x0]:.3g}" if len(seconds) == 2 else "-"
        table.append(
            {
                "paper line": entry.name,
                f"paper at {x0} (s)": y0,
                f"paper at {x1} (s)": y1,
                f"paper {x1}/{x0}": f"{y1 / y0:.3g}",
                "matched series here": series or "-",
                f"here at {x0} (s)": mine[x0],
                f"here at {x1} (s)": mine[x1],
                f"here {x1}/{x0}": ratio,
            }
        )
    note = (
        f"Endpoints read off the paper's Figure 5 (right) by eye, {paper.FIG5_TOKENS_PER_STEP} tokens per step, "
        f"hardware not stated ({paper.CITATION}). Only the two read-off points per line are drawn (hollow "
        "markers, dashed line); nothing between them is the paper's."
    )
    if tokens != paper.FIG5_TOKENS_PER_STEP:
        note += (
            f" This run used {tokens} tokens per step, so the paper's lines are not drawn; compare the 32K/1K ratios, not absolute times."
        )
        lines = []
    return lines, pd.DataFrame(table), note


def lra_comparison(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
    """Speed and memory relative to the Transformer, LRA's Table 2 beside this run, or None unless
    `rows` are a model training run with a `full` series and another LRA family at an LRA length.

    Returns (speed, memory, words): tables with one row per LRA model present here and one column per
    length, each cell "LRA / here"; speed = the Transformer's time per step over the series' (LRA:
    steps/s over the Transformer's), memory = the series' peak over the Transformer's, the state
    (parameters, gradients, optimizer) included where the run has the breakdown, as in LRA's
    per-device peak. `words` states the largest common length in a sentence, with the scale."""
    if _first(rows, "workload") != "model" or _first(rows, "mode") != "train_step":
        return None
    ok = with_series(rows[rows["status"] == "ok"], "seq_len")
    lengths = [n for n in paper.LRA_LENGTHS if n in set(ok["seq_len"])]
    state = [c for c in ("param_mem_mib", "grad_mem_mib", "optim_mem_mib") if c in ok]
    memory = ok["peak_mem_mib"] + (ok[state].fillna(0).sum(axis=1) if state else 0)
    ok = ok.assign(memory_total=memory)
    full = ok[ok["variant"] == "full"].drop_duplicates("seq_len").set_index("seq_len")
    families = {m.variant for m in paper.LRA_TABLE2[1:]}
    if full.empty or not lengths or not set(ok["variant"]) & families:
        return None
    speed_rows, memory_rows, said = [], [], []
    longest = max(n for n in lengths if n in full.index)
    for model in paper.LRA_TABLE2:
        lra_speed, lra_memory = paper.lra_relative(model)
        for series, cells in ok[ok["variant"] == model.variant].groupby("series", sort=False):
            cells = cells.drop_duplicates("seq_len").set_index("seq_len")
            speed, mem = {"LRA model": model.name, "series here": series}, {"LRA model": model.name, "series here": series}
            for n in lengths:
                here = n in cells.index and n in full.index
                ours_speed = full.at[n, "time_ms_median"] / cells.at[n, "time_ms_median"] if here else math.nan
                ours_memory = cells.at[n, "memory_total"] / full.at[n, "memory_total"] if here else math.nan
                column = f"{n // 1024}K (LRA / here)"
                speed[column] = f"{_times(lra_speed.get(n))} / {_times(ours_speed)}"
                mem[column] = f"{_times(lra_memory.get(n), 2)} / {_times(ours_memory, 2)}"
                if n == longest and model.variant != "full" and math.isfinite(ours_speed):
                    said.append(
                        f"{series} {ours_speed:.1f}x the Transformer's steps/s and {ours_memory:.2f}x its memory "
                        f"(LRA's {model.name}: {_times(lra_speed.get(n))}, {_times(lra_memory.get(n), 2)})"
                    )
            speed_rows.append(speed)
            memory_rows.append(mem)
    batch, layers = _first(rows, "batch"), _first(rows, "n_layers")
    words = (
        f"Beside LRA's efficiency table ({paper.LRA_CITATION}; {paper.LRA_SETUP}). Here: batch {batch}, "
        f"{layers} layers, {_first(rows, 'device_name') or _first(rows, 'device')}, so only ratios to the Transformer "
        "compare; absolute steps/s and GB do not transfer across batch, depth and hardware. LRA's ratios are "
        "recomputed from its steps/s and GB (so 1.1x where LRA prints a rounded 1.2x). "
        f"At {longest // 1024}K here: " + ("; ".join(said) if said else "no family finished") + "."
    )
    return pd.DataFrame(speed_rows).set_index("LRA model"), pd.DataFrame(memory_rows).set_index("LRA model"), words


def _times(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}x"


def _lra_blocks(rows: pd.DataFrame) -> list[Block]:
    """The "Beside Long Range Arena" section of `lra_comparison`, or [] when it does not apply."""
    found = lra_comparison(rows)
    if found is None:
        return []
    speed, memory, words = found
    return [
        ("h2", "Beside Long Range Arena (Table 2)"),
        ("p", words),
        ("h3", "Speed relative to the Transformer (its time per step over the series')"),
        ("table", speed),
        ("h3", "Peak memory relative to the Transformer (state included)"),
        ("table", memory),
    ]


# --------------------------------------------------------------------------- noise and compare


def _quartiles(row: pd.Series, suffix: str) -> tuple[float, float]:
    return figures.time_quartiles(row.get(f"time_ms_samples{suffix}"), row.get(f"time_ms_median{suffix}"), row.get(f"time_ms_iqr{suffix}"))


def noise_check(row: pd.Series) -> tuple[bool, float, bool]:
    """(within noise, p-value or NaN, IQRs overlap) for a merged row with `_a`/`_b` timing columns.

    A difference is beyond noise only when the interquartile ranges of the two cells do not overlap
    and, where both have enough repeats for it to reach ALPHA at all, a two-sided Mann-Whitney U test
    on the timing samples gives p < ALPHA (with 3 + 3 repeats it cannot: the IQRs alone decide)."""
    (a25, a75), (b25, b75) = _quartiles(row, "_a"), _quartiles(row, "_b")
    overlap = bool(a25 <= b75 and b25 <= a75)
    a, b = row.get("time_ms_samples_a"), row.get("time_ms_samples_b")
    p = float("nan")
    if isinstance(a, (list, np.ndarray)) and isinstance(b, (list, np.ndarray)) and len(a) >= 2 and len(b) >= 2:
        if 2 * stats.min_p_value(len(a), len(b)) < ALPHA:
            p = stats.mann_whitney_u(list(a), list(b), alternative="two-sided").pvalue
    return overlap or (not math.isnan(p) and p >= ALPHA), p, overlap


def _match_columns(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    try:
        from harness.cells import model_fields

        model = list(model_fields())
    except Exception:  # the schema needs torch; without it, the model columns a row can carry
        model = [
            "vocab_size",
            "d_model",
            "n_heads",
            "d_ff",
            "n_layers",
            "max_seq_len",
            "residual",
            "ffn_chunks",
            "activation",
            "axial_shape",
            "causal",
            "dropout",
        ]
    return [c for c in (*MATCH_CORE, *model) if c in a.columns or c in b.columns]


def _canonical_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _match_key(rows: pd.DataFrame, columns: list[str]) -> pd.Series:
    def key(row: pd.Series) -> str:
        return json.dumps({c: _canonical_value(row.get(c)) for c in columns}, sort_keys=True, default=str)

    return rows.apply(key, axis=1)


def compare_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per cell present in both runs (matched on the configuration columns, not cell_key):
    medians, `ratio` = B/A of the median time, `within_noise`, `p_value`, `iqr_overlap`,
    `memory_ratio` = B/A of peak memory, both statuses and `contended_a`/`contended_b`;
    `inconclusive` when the cell finished in both but was contended in either (then `within_noise`
    is None: neither within noise nor beyond it). Raises ResultsError when nothing matches."""
    columns = _match_columns(a, b)
    keep = ["_key", "status", "time_ms_median", "time_ms_iqr", "time_ms_samples", "peak_mem_mib", "contended", "contention"]
    missing = {c: None for c in keep[1:]}  # a column only one run has must not lose its side in the merge
    a = a.assign(_key=_match_key(a, columns), **{c: v for c, v in missing.items() if c not in a})
    b = b.assign(_key=_match_key(b, columns), **{c: v for c, v in missing.items() if c not in b})
    merged = a.merge(b[[c for c in keep if c in b]], on="_key", suffixes=("", "_b"), how="inner")
    if merged.empty:
        differing = [c for c in columns if c in a and c in b and set(a[c].astype(str)) != set(b[c].astype(str))]
        raise ResultsError(
            "the two runs have no cells with the same configuration" + (f" (they differ in: {', '.join(differing)})" if differing else "")
        )
    merged = merged.rename(columns={c: f"{c}_a" for c in keep[1:] if c in merged})
    for column in keep[1:]:
        for side in ("_a", "_b"):
            if f"{column}{side}" not in merged:
                merged[f"{column}{side}"] = np.nan
    ok = (merged["status_a"] == "ok") & (merged["status_b"] == "ok")
    merged["ratio"] = np.where(ok, merged["time_ms_median_b"] / merged["time_ms_median_a"], np.nan)
    merged["memory_ratio"] = np.where(ok, merged["peak_mem_mib_b"] / merged["peak_mem_mib_a"], np.nan)
    # A cell contended in either run is inconclusive: its ratio is shown, never judged.
    merged["inconclusive"] = ok & (merged["contended_a"].astype(object).eq(True) | merged["contended_b"].astype(object).eq(True))
    checks = [
        noise_check(r) if is_ok and not vague else (None, np.nan, None)
        for (_, r), is_ok, vague in zip(merged.iterrows(), ok, merged["inconclusive"])
    ]
    merged["within_noise"] = [c[0] for c in checks]
    merged["p_value"] = [c[1] for c in checks]
    merged["iqr_overlap"] = [c[2] for c in checks]
    # one status for drawing: ok when both finished, else the first side's failure ("oom" ...)
    merged["status"] = merged["status_a"].where(merged["status_a"] != "ok", merged["status_b"])
    return merged.drop(columns="_key")


# --------------------------------------------------------------------------- documents


Block = tuple  # ("h1"|"h2"|"h3"|"p"|"code", text) | ("table", DataFrame[, "left"]) | ("figure", stem, caption)


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    index = frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex)
    corner = " \\ ".join(str(n) for n in (frame.index.name, frame.columns.name) if n)
    header = ([corner] if index else []) + [str(c) for c in frame.columns]
    body = [([str(i)] if index else []) + [_cell_text(v) for v in row] for i, row in zip(frame.index, frame.to_numpy())]
    return header, body


# A link target that may become a link: http(s), or a relative path (no scheme, not `//host`).
_SAFE_URL = re.compile(r"(?i)https?://[^\s<>\"'`\\]+|(?!//)[^\s:<>\"'`\\]+")
_CODE_SPAN = re.compile(r"(`[^`\n]+`)")
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")  # how raw HTML (a tag, comment, declaration) or an autolink begins
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def safe_url(url: str) -> bool:
    """Whether `url` (as written in Markdown: entities are decoded there) is http(s) or relative."""
    return bool(_SAFE_URL.fullmatch(html.unescape(url)))


def markdown_text(text: str) -> str:
    """`text` (which may hold user text: descriptions, labels, messages, file names) as Markdown
    that passes no raw HTML: outside code spans a `<` that would open a tag, comment or autolink becomes `&lt;`, and a link whose target
    is not http(s) or relative (`javascript:`, `data:`) is shown as text, not as a link."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        part, pieces, last = _TAG_OPEN.sub("&lt;", parts[i]), [], 0
        for match in _LINK.finditer(part):  # brackets outside safe links escaped: no other link form survives
            pieces += [_brackets(part[last : match.start()]), match.group(0) if safe_url(match.group(2)) else _brackets(match.group(0))]
            last = match.end()
        parts[i] = "".join([*pieces, _brackets(part[last:])])
    return "".join(parts)


def _brackets(text: str) -> str:
    return text.replace("[", "\\[").replace("]", "\\]")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text` (so the text cannot close it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def to_markdown(blocks: list[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown; text escaped by `markdown_text`."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + markdown_text(block[1]))
        elif kind == "p":
            out.append(markdown_text(block[1]))
        elif kind == "code":
            fence = _fence(block[1])
            out.append(f"{fence}\n{block[1]}\n{fence}")
        elif kind == "figure":
            stem, caption = block[1], markdown_text(block[2])
            out.append(f"![{caption}]({stem}.png)\n\n*{caption}* ([SVG]({stem}.svg))")
        elif kind == "table":
            header, body = _table_rows(block[1])
            cell = lambda s: markdown_text(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """HTML of one line of text: all of it escaped; code spans; only http(s) and relative links live."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)

    def link(match: re.Match) -> str:
        url = html.unescape(match.group(2))
        return f'<a href="{match.group(2)}">{match.group(1)}</a>' if safe_url(url) else match.group(0)

    return _LINK.sub(link, escaped)


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?|")  # numbers (and empty cells) are right-aligned
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.t,th:first-child,table.left td{text-align:left}td:first-child{white-space:nowrap}
figure{margin:1.5em 0}
img{max-width:100%;height:auto}figcaption{font-size:14px;color:#444}pre{background:#f6f6f6;padding:.7em;overflow-x:auto}
code{background:#f3f3f3;padding:0 3px}"""


def _td(text: str) -> str:
    """A table cell: numbers right-aligned (the CSS default), text left-aligned."""
    return f"<td>{html.escape(text)}</td>" if _NUMBER.fullmatch(text) else f'<td class="t">{html.escape(text)}</td>'


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    """The blocks as one HTML page; PNGs from `folder` embedded as base64, SVGs linked relatively."""
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "figure":
            stem, caption = block[1], block[2]
            data = base64.b64encode((folder / f"{stem}.png").read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f'<figcaption>{_inline(caption)} (<a href="{stem}.svg">SVG</a>, '
                f'<a href="{stem}.png">PNG</a>)</figcaption></figure>'
            )
        elif kind == "table":
            header, body = _table_rows(block[1])
            rows = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in body)
            css = ' class="left"' if block[2:] == ("left",) else ""
            out.append(
                f"<table{css}><thead><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                + f"</tr></thead><tbody>{rows}</tbody></table>"
            )
    out.append("</body></html>\n")
    return "\n".join(out)


def _write_document(blocks: list[Block], folder: Path, title: str) -> None:
    atomic_write_text(folder / "report.md", to_markdown(blocks))
    atomic_write_text(folder / "index.html", to_html(blocks, folder, title))


def output_folder(base: Path, *parts: tuple[str, str, Path]) -> Path:
    """`base/<name>/...` for (name, what, file it came from) parts read from stored runs: each a
    plain name (`harness.safe_io.check_name`) and the result under `base`; ResultsError otherwise."""
    try:
        folder = base.joinpath(*(check_name(name, what, where) for name, what, where in parts))
        return check_under(folder, base)
    except InputFileError as error:
        raise ResultsError(f"{error}; not used as a folder name") from None


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A new temporary folder beside `folder` to write a report into; when the block ends without an
    error its files are moved into `folder` (created if need be), else it is removed: a report that
    fails half-way leaves no figures without their report.md."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir(), key=lambda f: f.name in ("report.md", "index.html")):  # documents last
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Turn an OSError while writing into `folder` (full disk, read-only place, a file in the way)
    into a ResultsError naming the folder (exit 2)."""
    try:
        yield
    except OSError as error:
        raise ResultsError(f"cannot write to {folder}: {error.strerror or error}; choose another --out") from None


# --------------------------------------------------------------------------- report sections


def _subtitle(rows: pd.DataFrame, x: str) -> str:
    tokens = _tokens_per_step(rows)
    parts = [f"{tokens:,} tokens per step (batch = {tokens:,} / length)" if tokens and x == "seq_len" else ""]
    parts.append(" ".join(str(v) for v in (_first(rows, "device_name") or _first(rows, "device"), _first(rows, "dtype")) if v))
    parts.append(", ".join(fixed_settings(rows, exclude=[x])))
    return "\n".join(textwrap.fill(p, 100) for p in parts if p)


def _what(rows: pd.DataFrame) -> str:
    """ "one attention layer, forward + backward"; "training on duplication" for quality rows."""
    workload, mode, task = _first(rows, "workload"), _first(rows, "mode"), _first(rows, "task")
    if workload is None and task is not None:
        return f"training on {task}"
    return ", ".join(str(t) for t in (WORKLOAD_TEXT.get(workload, workload), MODE_TEXT.get(mode, mode)) if t)


def _figure_plan(rows: pd.DataFrame) -> list[tuple[str, figures.Metric, str]]:
    """(x, metric, file stem) for every figure the varying columns call for."""
    plan = []
    for x in sweep_axes(rows):
        metrics = [figures.TIME, figures.MEMORY, figures.THROUGHPUT] if x == "seq_len" else [figures.MEMORY, figures.TIME]
        names = {"time_ms_median": "time", "peak_mem_mib": "memory", "tokens_per_s": "tokens_per_s"}
        plan += [(x, m, f"{names[m.column]}_vs_{x}") for m in metrics]
    return plan


def all_series(rows: pd.DataFrame) -> list[str]:
    """Every series label any figure of these rows uses (for one palette across a report)."""
    bench, curve, _grid, _other = _split(rows)
    labels: list[str] = []
    for x in sweep_axes(bench) or ["seq_len"]:
        labels += list(with_series(bench, x)["series"])
    if not curve.empty and "variant_label" in curve:
        labels += list(with_series(curve, "step")["series"])
    return labels


def _figure_blocks(rows: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> tuple[list[Block], list[Block]]:
    """Draw the figures of the benchmark rows; return (figure blocks, paper-reference blocks)."""
    blocks: list[Block] = []
    paper_blocks: list[Block] = []
    for x, metric, stem in _figure_plan(rows):
        frame = with_series(rows, x)
        finished = frame[frame["status"] == "ok"]
        if metric.column not in frame or pd.to_numeric(finished.get(metric.column), errors="coerce").isna().all():
            blocks.append(("p", f"No `{metric.column}` of a finished cell to draw against {x} (see the tables)."))
            continue
        title_name, names = legend_names(frame)
        short, x_label = AXIS_TEXT[x]
        lines: list = []
        if metric is figures.TIME and x == "seq_len":
            lines, table, note = paper_fig5(rows, palette)
            if table is not None:
                paper_blocks = [("h2", "Paper reference (Fig. 5)"), ("p", note), ("table", table)]
        mem_kind = "training memory" if _first(rows, "mode") != "forward" else "memory"
        title = {
            "time_ms_median": f"Time per step vs {short}",
            "peak_mem_mib": f"Peak {mem_kind} vs {short}",
            "tokens_per_s": f"Throughput vs {short}",
        }[metric.column] + f" ({_what(rows)})"
        fig = figures.plot_metric(
            frame,
            x,
            metric,
            palette,
            title=title,
            subtitle=_subtitle(rows, x),
            x_label=x_label,
            legend_title=title_name,
            names=names,
            paper=lines,
            paper_title="paper, Fig. 5 (endpoints read off)",
        )
        figures.save(fig, folder, stem)
        caption = f"{title}. " + (
            "Median of the timed repeats per cell; band: their interquartile range" if metric.band else "One measurement per cell"
        )
        caption += ". 'x' on the top edge: cells that did not finish, with their status" if (frame["status"] != "ok").any() else ""
        caption += "; hollow markers and dashed lines: the paper's read-off endpoints" if lines else ""
        blocks.append(("figure", stem, caption + "."))
    return blocks, paper_blocks


def _floor_blocks(rows: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """ "Time over compute floor" (`floor_ratio`, series x primary axis, and its figure) when the run
    measured the matmul rate (the suite's `measure.matmul_rate`); [] otherwise."""
    if "floor_ratio" not in rows or pd.to_numeric(rows["floor_ratio"], errors="coerce").notna().sum() == 0:
        return []
    axes = sweep_axes(rows)
    x = axes[0] if axes else "seq_len"
    rates = pd.to_numeric(rows.get("matmul_gflops"), errors="coerce").dropna()
    sizes = sorted({int(n) for n in pd.to_numeric(rows.get("matmul_n", pd.Series(dtype=float)), errors="coerce").dropna()})
    low, high = rates.min(), rates.max()
    gflops = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"  # noqa: E731 (plain numbers, never 4e+05)
    rate = (
        f"{gflops(low)} GFLOP/s"
        if math.isclose(low, high, rel_tol=5e-3)
        else f"{gflops(low)} to {gflops(high)} GFLOP/s (median {gflops(rates.median())})"
    )
    size = f", n = {', '.join(map(str, sizes))}" if sizes else ""
    forward = _first(rows, "mode") == "forward"
    text = (
        "Median time per step over the compute floor, `floor_ratio` = (`time_ms_median` / 1000) / `floor_s`, "
        "where `floor_s` = `flops` / (`matmul_gflops` * 1e9) is the time the cell's analytic FLOPs "
        + ("(forward only) " if forward else "(forward, plus backward counted as 2x forward, LSH hashing once) ")
        + "take at the matrix-multiply rate measured in the cell's own process right after its timing "
        f"(the fastest of a few square matmuls in the cell's dtype{size}). 1 means the step runs at the "
        'matmul rate; "within 1.5x of the compute floor" means at most 1.5. '
        f"Matmul rate measured in this run: {rate}. Cells that did not finish show their status."
    )
    blocks: list[Block] = [("h2", "Time over compute floor"), ("p", text)]
    if axes:
        frame = with_series(rows, x)
        title_name, names = legend_names(frame)
        short, x_label = AXIS_TEXT[x]
        title = f"Time over compute floor vs {short} ({_what(rows)})"
        subtitle = "\n".join(p for p in (_subtitle(rows, x), f"floor: the FLOPs at the measured matmul rate, {rate}") if p)
        fig = figures.plot_metric(
            frame, x, figures.FLOOR_RATIO, palette, title=title, subtitle=subtitle, x_label=x_label, legend_title=title_name, names=names
        )
        stem = f"floor_ratio_vs_{x}"
        figures.save(fig, folder, stem)
        caption = f"{title}. Median time per step over the compute floor of each cell (1 = the matmul rate)"
        caption += ". 'x' on the top edge: cells that did not finish, with their status" if (frame["status"] != "ok").any() else ""
        blocks.append(("figure", stem, caption + "."))
    blocks.append(("table", pivot_metric(rows, "floor_ratio", columns=x, fmt="{:.3g}", mark_contended=True)))
    return blocks


def memory_breakdown_table(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per finished cell (series, `x`): the four parts of `figures.MEMORY_PARTS` and their total, MiB;
    empty when the rows have no breakdown (runs stored before it existed)."""
    columns = [column for column, _ in figures.MEMORY_PARTS]
    finished = with_series(rows, x)
    finished = finished[finished["status"] == "ok"]
    if "activation_mem_mib" not in finished or finished["activation_mem_mib"].isna().all():
        return pd.DataFrame()
    parts = finished[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    table = pd.concat([finished[["series", x]], parts.round(1), parts.sum(axis=1).round(1).rename("total_mib")], axis=1)
    order = figures.series_order(table["series"])
    return table.assign(_order=table["series"].map(order.index)).sort_values(["_order", x]).drop(columns="_order")


def growth_text(table: pd.DataFrame, x: str) -> str:
    """One sentence per series: activation memory and total at the largest `x` over the smallest."""
    parts = []
    for series, part in table.groupby("series", sort=False):
        part = part.sort_values(x)
        if len(part) < 2:
            continue
        low, high = part.iloc[0], part.iloc[-1]
        ratio = high["activation_mem_mib"] / low["activation_mem_mib"] if low["activation_mem_mib"] > 0 else math.nan
        parts.append(
            f"{series}: activations {low['activation_mem_mib']:.1f} -> {high['activation_mem_mib']:.1f} MiB ({ratio:.2f}x) and "
            f"total {low['total_mib']:.1f} -> {high['total_mib']:.1f} MiB "
            f"from {x} = {figures.format_count(low[x])} to {figures.format_count(high[x])}"
        )
    return "; ".join(parts)


REVERSIBLE_CLAIM = (
    "The paper (section 3) claims that reversible layers store activations once for the whole stack instead of once per "
    "layer, so activation memory does not grow with depth, while a standard stack's grows with every layer; parameters, "
    "gradients and optimizer state grow with depth either way."
)


def _target_blocks(run: StoredRun) -> list[Block]:
    """The suite's `checks: targets:` evaluated on this run, as `harness check RUN --targets` does."""
    try:
        checked = for_check(run)
        rules, source = rules_for(checked)
        if not rules.targets:
            return []
        table = evaluate_targets(checked.rows, rules.targets)
    except ResultsError as error:
        return [("h2", "Targets"), ("p", f"The suite's targets could not be evaluated: {error}")]
    verdict = [("inconclusive" if vague else "MET" if met else "MISSED") for met, vague in zip(table["met"], table["inconclusive"])]
    shown = table.drop(columns=["met", "inconclusive"]).assign(
        value=table["value"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "-"), verdict=verdict
    )
    met, missed = verdict.count("MET"), verdict.count("MISSED")
    text = (
        f"{met} of {len(table)} met" + (f", {missed} missed" if missed else "") + f" (from {source}; "
        "`python -m harness check RUN --targets` prints the same table and exits 1 on a miss)."
    )
    return [("h2", "Targets"), ("p", text), ("table", shown.set_index("target"))]


def _memory_breakdown_blocks(rows: pd.DataFrame, folder: Path) -> list[Block]:
    """The stacked memory breakdown (figure and table) against every sweep axis, with its growth in words."""
    blocks: list[Block] = []
    for x in sweep_axes(rows):
        table = memory_breakdown_table(rows, x)
        if table.empty:
            continue
        short, x_label = AXIS_TEXT[x]
        title_name, names = legend_names(with_series(rows, x))
        title = f"Memory breakdown vs {short} ({_what(rows)})"
        fig = figures.plot_memory_breakdown(table, x, title=title, subtitle=_subtitle(rows, x), x_label=x_label, names=names)
        stem = f"memory_breakdown_vs_{x}"
        figures.save(fig, folder, stem)
        caption = (
            "Parameters and buffers, gradients and optimizer state (exact tensor sizes) under the step's peak above them "
            "(activations and temporaries, measured)"
        )
        blocks += [("h3", f"Memory breakdown by {x}"), ("figure", stem, caption + ".")]
        growth = growth_text(table, x)
        if x == "n_layers" and "residual" in rows and rows["residual"].nunique() > 1:
            blocks.append(("p", REVERSIBLE_CLAIM + (f" Measured: {growth}." if growth else "")))
        elif growth:
            blocks.append(("p", f"Measured: {growth}."))
        blocks.append(("table", table.set_index("series")))
    return [("h2", "Memory breakdown (MiB)")] + blocks if blocks else []


def _contention_blocks(rows: pd.DataFrame, x: str) -> list[Block]:
    """The contended cells (`contended`: their timing stayed disturbed by other load after
    re-measuring), with their CPU share and reason; [] when there are none."""
    contended = with_series(rows[is_contended(rows)], x)
    if contended.empty:
        return []
    share = contended["cpu_share"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}") if "cpu_share" in contended else ""
    retries = contended["contention_retries_used"] if "contention_retries_used" in contended else ""
    table = pd.DataFrame(
        {"series": contended["series"], x: contended[x], "CPU share": share, "re-measured": retries, "contention": contended["contention"]}
    ).set_index("series")
    text = (
        f"`{CONTENDED_MARK}` in the tables, crossed hollow markers in the figures: {len(contended)} of "
        f"{int(rows['contended'].notna().sum())} cells stayed contended after re-measuring (other load on the "
        "machine disturbed their timing: CPU share = process CPU time / (wall time x threads) below the "
        "threshold while other processes kept cores busy, or other processes / slowed clocks on the GPU). Their "
        "times are not trustworthy; `harness compare` and `harness check` treat them as inconclusive."
    )
    return [("h3", "Contended cells"), ("p", text), ("table", table)]


def _drift_blocks(rows: pd.DataFrame, x: str) -> list[Block]:
    """Round-to-round drift of cells measured in rounds (`measure.rounds`): `round_drift` = max / min
    of the round medians - 1, per cell; [] without rounds."""
    if "round_drift" not in rows or pd.to_numeric(rows["round_drift"], errors="coerce").notna().sum() == 0:
        return []
    drift = pd.to_numeric(rows["round_drift"], errors="coerce").dropna()
    rounds = int(pd.to_numeric(rows["rounds"], errors="coerce").max())
    text = (
        f"Each cell was measured in {rounds} rounds, interleaved (round 1 of every cell, then round 2 of every cell "
        "in a shuffled order, ...); its samples are the union and its median time is the median of its round "
        "medians. Drift = slowest round median / fastest round median - 1: how far the machine moved between "
        f"rounds. Median drift {drift.median():.1%}, largest {drift.max():.1%}."
    )
    table = pivot_metric(rows, "round_drift", columns=x, fmt="{:.1%}", mark_contended=True)
    return [("h3", "Round-to-round drift"), ("p", text), ("table", table)]


def machine_load_text(rows: pd.DataFrame) -> str:
    """One line on the machine's load during the run, from the cells' contention columns: CPU share
    (median and range), other processes' cores, load average, GPU processes, contended cells."""
    parts = []

    def numbers(column: str) -> pd.Series:
        return pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series(dtype=float)

    share, other, load, gpu = numbers("cpu_share"), numbers("other_cpu_cores"), numbers("load_avg_1m"), numbers("gpu_other_processes")
    if len(share):
        parts.append(f"CPU share median {share.median():.2f} ({share.min():.2f}-{share.max():.2f})")
    if len(other):
        parts.append(f"other processes' CPU {other.median():.2f} cores median (max {other.max():.2f})")
    if len(load):
        parts.append(f"load average {load.min():.1f}-{load.max():.1f}")
    if len(gpu):
        parts.append(f"other GPU processes up to {int(gpu.max())}")
    if "contended" in rows:
        parts.append(f"{int(is_contended(rows).sum())} of {int(rows['contended'].notna().sum())} cells contended")
    return "; ".join(parts) or "not recorded"


def _fit_blocks(rows: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    tokens = _tokens_per_step(rows)
    for x in sweep_axes(rows):
        fits = scaling_fits(rows, x)
        if fits.empty:
            continue
        if figures.is_log_axis(rows[x]):
            fits = fits.rename(columns={"time": f"k time (time ~ {x}^k)", "memory": f"k memory (memory ~ {x}^k)"})
            text = f"Least-squares fit of log(metric) on log({x}) per series over the cells that finished (status ok)."
            if x == "seq_len":
                if tokens:
                    fits["per-sequence time exponent (k + 1)"] = fits[f"k time (time ~ {x}^k)"] + 1
                    text += (
                        f" At constant tokens per step ({tokens:,}): batch = {tokens:,}/L, so k = 0 means a flat "
                        "cost per step (linear per sequence) and k = 1 a cost per sequence growing as L^2."
                    )
                else:
                    text += " At a constant batch, k is the exponent per sequence."
        else:
            unit = {"n_layers": "layer"}.get(x, x)
            fits = fits.rename(columns={"time": f"ms per {unit}", "memory": f"MiB per {unit}"})
            text = f"Least-squares line of median time and peak memory against {x} per series (ok cells): the slope."
        blocks += [("h3", f"Scaling with {x}"), ("p", text), ("table", fits.set_index("series"))]
    return [("h2", "Scaling fits")] + blocks if blocks else []


def _curve_blocks(curve: pd.DataFrame, grid: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """Learning curves (bits per dim against step, mean over repeated rows such as seeds) and the
    train-by-eval table of accuracy (%, or eval bits per dim where no accuracy was scored)."""
    blocks: list[Block] = []
    measured = [c for c in ("train_bpd", "eval_bpd", "eval_accuracy") if c in curve]
    if not curve.empty and {"train_bpd", "eval_bpd"} & set(measured):
        frame = with_series(curve, "step")
        title_name, names = legend_names(frame)
        means = frame.groupby(["series", "step"], sort=False)[measured].mean().reset_index()
        fig = figures.plot_bpd_curves(
            means,
            palette,
            title=f"Bits per dim during training ({_what(frame)})",
            subtitle=_subtitle(frame, "step"),
            legend_title=title_name,
            names=names,
        )
        figures.save(fig, folder, "bpd_curves")
        last = means.sort_values("step").groupby("series", sort=False).tail(1).set_index("series")
        last = last.reindex([s for s in dict.fromkeys(frame["series"]) if s in last.index])
        blocks += [
            ("h2", "Learning curves"),
            ("figure", "bpd_curves", "Bits per dim (bits per byte/symbol) against training step: train solid, eval dashed."),
            ("p", "Last logged step per series:"),
            ("table", last[["step", *measured]]),
        ]
    if not grid.empty and "eval_variant" in grid:
        frame = with_series(grid, "step")
        scored = "accuracy" in frame and frame["accuracy"].notna().any()
        value = "accuracy" if scored else "eval_bpd"
        if value not in frame:
            return blocks
        table = frame.pivot_table(index="series", columns="eval_variant", values=value, aggfunc="mean", sort=False)
        table = table.reindex(index=list(dict.fromkeys(frame["series"])), columns=list(dict.fromkeys(frame["eval_variant"])))
        table.index.name, table.columns.name = "trained with", "evaluated with"
        shown = table.map(lambda v: "" if pd.isna(v) else (f"{v:.1f}" if scored else f"{v:.3f}"))
        blocks.append(("h2", "Train-by-eval " + ("accuracy (%)" if scored else "bits per dim")))
        if scored:
            fig = figures.plot_accuracy_grid(table, title="Accuracy (%): trained with (rows) x evaluated with (columns)")
            figures.save(fig, folder, "train_eval_accuracy")
            blocks.append(("figure", "train_eval_accuracy", "Accuracy (%) by training (rows) and evaluation (columns) variant."))
        blocks.append(("table", shown))
        if scored:
            reference = pd.DataFrame(paper.TABLE2, index=paper.TABLE2_EVAL).T
            reference.index.name, reference.columns.name = "trained with", "evaluated with"
            blocks += [
                ("p", f"For reference, the paper's Table 2 (duplication task, 1 layer, accuracy %; {paper.CITATION}):"),
                ("table", reference),
            ]
            scale = paper.table2_scale_note(frame)
            blocks += [("p", scale)] if scale else []
    return blocks


def numerics_items(env: dict, rows: pd.DataFrame) -> list[tuple[str, Any]]:
    """Environment-table lines of the settings that change numbers (harness.environment): float32
    matmul precision (the cells' own when they recorded it), TF32, determinism, optional package
    versions (those the cells imported, and those installed), CPU governor / boost, GPU clock lock."""
    numerics = env.get("numerics") or {}

    def used(column: str, fallback: Any) -> Any:
        values = sorted({str(v) for v in rows[column].dropna()}) if column in rows else []
        return ", ".join(values) if values else fallback

    imported: dict[str, str] = {}
    recorded = "optional_packages" in rows and rows["optional_packages"].notna().any()
    for text in rows["optional_packages"].dropna().unique() if recorded else []:
        try:
            imported.update(json.loads(str(text)))
        except (ValueError, TypeError, AttributeError):
            continue
    installed = env.get("optional_packages") or {}
    frequency = env.get("cpu_frequency") or {}
    clocks = env.get("gpu_clocks") or {}
    if not numerics and not installed and not frequency and not clocks and "float32_matmul_precision" not in rows:
        return []  # a run from before these were recorded
    return [
        ("float32 matmul precision", used("float32_matmul_precision", numerics.get("float32_matmul_precision"))),
        (
            "TF32 (CUDA matmul / cuDNN)",
            f"{used('tf32_cuda_matmul', numerics.get('tf32_cuda_matmul'))} / {used('tf32_cudnn', numerics.get('tf32_cudnn'))}",
        ),
        ("deterministic algorithms", used("deterministic_algorithms", numerics.get("deterministic_algorithms"))),
        (
            "optional packages imported by the cells",
            ", ".join(f"{k} {v}" for k, v in sorted(imported.items())) or "none" if recorded else None,
        ),
        ("optional packages installed", ", ".join(f"{k} {v}" for k, v in sorted(installed.items())) or "none" if env else None),
        ("CPU governor / boost", f"{frequency.get('governor', 'unknown')} / {frequency.get('boost', 'unknown')}" if frequency else None),
        ("GPU clocks locked (NVML)", clocks.get("clocks_locked") if clocks else None),
    ]


def _environment_table(info: dict, rows: pd.DataFrame) -> pd.DataFrame:
    env = info.get("environment") or {}
    cores = f"{env.get('cpu_cores_physical', '?')} physical / {env.get('cpu_cores_logical', '?')} logical"
    nvml = env.get("nvml") or {}
    versions = sorted(rows["code_version"].dropna().astype(str).unique()) if "code_version" in rows else []
    items = [
        ("device", env.get("device_name") or env.get("device")),
        ("GPU driver", env.get("gpu_driver")),
        ("torch", env.get("torch")),
        ("CUDA (torch build)", env.get("torch_cuda")),
        ("cuDNN", env.get("cudnn")),
        ("threads (torch)", env.get("torch_threads")),
        *((f"backend: {name}", value) for name, value in (env.get("variant_backends") or {}).items()),
        ("CPU", f"{env.get('cpu_model', '?')} ({cores})"),
        ("CPU vector extensions", env.get("cpu_simd")),
        ("RAM (GiB)", env.get("ram_total_gib")),
        ("Python", env.get("python")),
        ("platform", env.get("platform")),
        ("git SHA", env.get("git_sha") or "none (not a git commit)"),
        ("git dirty", env.get("git_dirty")),
        ("code_version", info.get("code_version") or env.get("code_version")),
        ("code_version of the rows", ", ".join(versions)),
        ("GPU clocks at start (NVML)", ", ".join(f"{k}={v}" for k, v in nvml.items())),
        *numerics_items(env, rows),
        ("machine load during the run", machine_load_text(_split(rows)[0])),
        ("started", info.get("started_at") or env.get("started_at_utc")),
        (
            "finished",
            info.get("finished_at") or ("interrupted " + str(info["interrupted_at"]) if info.get("interrupted_at") else "not recorded"),
        ),
    ]
    frame = pd.DataFrame([(k, "-" if v is None or v == "" else str(v)) for k, v in items], columns=["", "value"])
    return frame.set_index("")


def _failed_table(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    failed = with_series(rows[rows["status"] != "ok"], x)
    message = failed["message"].fillna("").astype(str).map(lambda m: textwrap.shorten(m, 140)) if "message" in failed else ""
    return pd.DataFrame({"series": failed["series"], x: failed[x], "status": failed["status"].str.upper(), "message": message})


def report_blocks(run: StoredRun, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """Draw the figures of one run into `folder` and return the report's blocks."""
    rows = cell_rows(run.rows)
    bench, curve, grid, other = _split(rows)
    counts = rows["status"].value_counts().to_dict()
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items())
    blocks: list[Block] = [("h1", f"{run.suite}: {run.run_id}")]
    if run.info.get("description"):
        blocks.append(("p", " ".join(str(run.info["description"]).split())))
    what = _what(bench if not bench.empty else rows)
    blocks.append(
        ("p", f"{len(rows)} rows ({status_text}); {what}; results: `{run.path}`. Rendered from the stored results (nothing re-run).")
    )
    if run.corrupt:
        names = ", ".join(f"`{f.name}`" for f in run.corrupt[:10]) + (" ..." if len(run.corrupt) > 10 else "")
        blocks.append(
            (
                "p",
                f"**Warning: {len(run.corrupt)} cell file(s) could not be read and are missing from this "
                f"report:** {names} in `{run.path / 'cells'}`. `python -m harness run SUITE --resume "
                f"{run.run_id}` measures them again.",
            )
        )
    if not bench.empty:
        figure_blocks, paper_blocks = _figure_blocks(bench, folder, palette)
        if figure_blocks:
            blocks += [("h2", "Figures")] + figure_blocks
        axes = sweep_axes(bench)
        blocks.append(("h2", "Summary tables"))
        blocks.append(
            (
                "p",
                "Median time per step (ms) and peak memory (MiB) per cell; rows: series, columns: "
                f"{axes[0] if axes else 'seq_len'}. Cells that did not finish show their status.",
            )
        )
        for title, table in summary_tables(bench).items():
            blocks += [("h3", title), ("table", table)]
        blocks += _memory_breakdown_blocks(bench, folder)
        blocks += _contention_blocks(bench, axes[0] if axes else "seq_len")
        blocks += _drift_blocks(bench, axes[0] if axes else "seq_len")
        blocks += _floor_blocks(bench, folder, palette)
        blocks += _fit_blocks(bench)
        blocks += paper_blocks
        if (bench["status"] != "ok").any():
            blocks += [("h2", "Cells that did not finish"), ("table", _failed_table(bench, axes[0] if axes else "seq_len"))]
        notes = []
        if "mem_method" in bench and bench["mem_method"].notna().any():
            notes.append(
                "peak memory measured with "
                + ", ".join(f"`{m}`" for m in bench["mem_method"].dropna().unique())
                + " (peak above what was allocated before the measured call)"
            )
        if "timer" in bench and bench["timer"].notna().any():
            notes.append("timer " + ", ".join(f"`{t}`" for t in bench["timer"].dropna().unique()))
        if "n_repeats" in bench and bench["n_repeats"].notna().any():
            low, high = int(bench["n_repeats"].min()), int(bench["n_repeats"].max())
            notes.append(f"{low} timed repeats per cell" if low == high else f"{low} to {high} timed repeats per cell")
        if "time_noisy" in bench:
            noisy = int(bench["time_noisy"].fillna(False).astype(bool).sum())
            notes.append(f"{noisy} cell(s) noisy (IQR > 10% of the median)")
        if "contended" in bench:
            notes.append(f"{int(is_contended(bench).sum())} of {int(bench['contended'].notna().sum())} cell(s) contended")
        if "rounds" in bench and pd.to_numeric(bench["rounds"], errors="coerce").max() > 1:
            notes.append(f"{int(pd.to_numeric(bench['rounds'], errors='coerce').max())} interleaved rounds per cell")
        if notes:
            blocks.append(("p", "Measurement: " + "; ".join(notes) + "."))
        blocks += _lra_blocks(bench)
    blocks += _curve_blocks(curve, grid, folder, palette)
    blocks += _target_blocks(run)
    if not other.empty:
        failed = with_series(other, "step")
        message = failed["message"].fillna("").astype(str).map(lambda m: textwrap.shorten(m, 140)) if "message" in failed else ""
        blocks += [
            ("h2", "Rows that did not finish"),
            (
                "table",
                pd.DataFrame(
                    {"series": failed["series"], "status": failed["status"].astype(str).str.upper(), "message": message}
                ).set_index("series"),
            ),
        ]
    blocks += [
        ("h2", "Environment"),
        ("table", _environment_table(run.info, rows), "left"),
        ("h2", "Command"),
        ("p", "The command that produced these results (run.json):"),
        ("code", str(run.info.get("command") or "not recorded")),
        *(
            (("p", "Suite keys overridden on the command line:"), ("code", overrides_text(run.info["overrides"])))
            if overrides_text(run.info.get("overrides"))
            else ()
        ),
    ]
    return blocks


# --------------------------------------------------------------------------- entry points


def render_report(results: list[Path | str], out: Path | None = None, root: Path | str = RESULTS_ROOT) -> Path:
    """Render reports of stored runs; nothing is re-run.

    `results`: run folders, suite folders (their latest run), run ids or results.parquet files; empty:
    the latest run of every suite under `root`. Each run goes to `reports/<suite>/<run_id>/` (the
    `reports/` beside `root`, `reports_root`), or to
    `out` for a single run (`out/<suite>/<run_id>/` for several). Returns the report folder of a single
    run, or for several the path of the `index.html` that links them. Raises ResultsError for a
    missing or unreadable results folder or file.
    """
    runs = [open_run(r, root) for r in (list(results) or default_runs(root))]
    base = Path(out) if out is not None else reports_root(root)
    folders = []
    for run in runs:
        if out is not None and len(runs) == 1:
            folder = base
        else:
            folder = output_folder(base, (run.suite, "suite", run.path / RUN_INFO), (run.run_id, "run id", run.path))
        with writing(folder), staged(folder) as staging:
            # One palette per run, from its labels alone: the same series has the same colour in every
            # figure of the run, and in any other run or comparison whose labels are the same.
            blocks = report_blocks(run, staging, figures.series_palette(all_series(run.rows)))
            _write_document(blocks, staging, f"{run.suite} {run.run_id}")
        folders.append(folder)
    if len(runs) == 1:
        return folders[0]
    blocks = [("h1", "Reports")]
    for run, folder in zip(runs, folders):
        relative = folder.relative_to(base).as_posix()
        description = " ".join(str(run.info.get("description") or "").split())
        blocks.append(("p", f"[{run.suite}: {run.run_id}]({relative}/index.html) ([report.md]({relative}/report.md)). {description}"))
    index = base / "index.html"
    with writing(base):
        atomic_write_text(index, to_html(blocks, base, "Reports"))
    return index


def _inconclusive_table(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """Series, `x` and each run's contention reason of the inconclusive cells of a comparison."""

    def reason(value: Any) -> str:
        return value if isinstance(value, str) and value else "-"

    return pd.DataFrame(
        {
            "series": frame["series"],
            x: frame[x],
            "A contention": frame["contention_a"].map(reason),
            "B contention": frame["contention_b"].map(reason),
        }
    ).set_index("series")


def render_compare(
    run_a: Path | str,
    run_b: Path | str,
    out: Path | None = None,
    root: Path | str = RESULTS_ROOT,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Render the B/A time ratio per matched cell of two runs (figure, table, report.md, index.html)
    into `out` (default `reports/compare/<run_a>-vs-<run_b>/`); returns that folder. `echo` gets the
    summary lines (cells matched, beyond noise, inconclusive ones with their reasons)."""
    a, b = open_run(run_a, root), open_run(run_b, root)
    bench_a, bench_b = _split(a.rows)[0], _split(b.rows)[0]
    if bench_a.empty or bench_b.empty:
        raise ResultsError("compare needs benchmark rows (timings) in both runs")
    merged = compare_runs(bench_a, bench_b)
    if out is not None:
        folder = Path(out)
    else:
        folder = output_folder(reports_root(root) / "compare", (f"{a.run_id}-vs-{b.run_id}", "run ids", a.path))
    with writing(folder), staged(folder) as staging:
        _render_compare(a, b, bench_a, bench_b, merged, staging, echo)
    return folder


def _render_compare(
    a: StoredRun,
    b: StoredRun,
    bench_a: pd.DataFrame,
    bench_b: pd.DataFrame,
    merged: pd.DataFrame,
    folder: Path,
    echo: Callable[[str], None] | None,
) -> None:
    """The figure, table, report.md and index.html of `render_compare` in `folder`."""
    axes = sweep_axes(merged)
    x = axes[0] if axes else "seq_len"
    frame = with_series(merged, x)
    palette = figures.series_palette(frame["series"])
    title_name, names = legend_names(frame)
    fig = figures.plot_ratio(
        frame,
        x,
        palette,
        title=f"Median time per step, B / A ({_what(merged)})",
        subtitle=f"A = {a.suite}/{a.run_id}\nB = {b.suite}/{b.run_id}",
        names=names,
        x_label=AXIS_TEXT.get(x, (x, x))[1],
        legend_title=title_name,
    )
    figures.save(fig, folder, "time_ratio")
    table = pd.DataFrame(
        {
            "series": frame["series"],
            x: frame[x],
            "A time (ms)": frame["time_ms_median_a"].where(frame["status_a"] == "ok", frame["status_a"].str.upper()),
            "B time (ms)": frame["time_ms_median_b"].where(frame["status_b"] == "ok", frame["status_b"].str.upper()),
            "B/A time": frame["ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
            "within noise": [
                "inconclusive (contended)" if vague else "" if v is None or pd.isna(v) else ("yes" if v else "NO")
                for v, vague in zip(frame["within_noise"], frame["inconclusive"])
            ],
            "IQRs overlap": frame["iqr_overlap"].map(lambda v: "" if v is None else ("yes" if v else "no")),
            "Mann-Whitney p": frame["p_value"].map(lambda v: "" if pd.isna(v) else f"{v:.2g}"),
            "B/A memory": frame["memory_ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
        }
    ).set_index("series")
    significant = int((frame["within_noise"] == False).sum())  # noqa: E712 (None = not comparable)
    compared = int(frame["within_noise"].notna().sum())
    vague = frame[frame["inconclusive"]]
    summary = (
        f"{len(frame)} cells matched on their configuration ({', '.join(_match_columns(bench_a, bench_b))}); "
        f"{compared + len(vague)} finished in both, {significant} of them differ beyond noise"
        + (
            f", {len(vague)} inconclusive: contended in A or B (other load disturbed the timing), so neither within noise nor beyond it"
            if len(vague)
            else ""
        )
        + ". A ratio below 1 means B is faster."
    )
    inconclusive_lines = [
        f"inconclusive: {series} {x}={value}: "
        + "; ".join(
            f"{side} {reason}"
            for side, reason in (("A", r["contention_a"]), ("B", r["contention_b"]))
            if isinstance(reason, str) and reason
        )
        for series, value, (_, r) in zip(vague["series"], vague[x], vague.iterrows())
    ]
    blocks: list[Block] = [
        ("h1", f"Compare: {b.run_id} / {a.run_id}"),
        (
            "p",
            f"A: `{a.path}` ({(a.info.get('environment') or {}).get('device_name', '?')}, {a.info.get('code_version', '?')}); "
            f"B: `{b.path}` ({(b.info.get('environment') or {}).get('device_name', '?')}, {b.info.get('code_version', '?')}).",
        ),
        ("p", summary),
        (
            "p",
            "Noise check: a difference is beyond noise only when the interquartile ranges of the repeats do "
            f"not overlap and a two-sided Mann-Whitney U test on the timing samples (`harness.stats`) gives "
            f"p < {ALPHA}; where the repeats are too few for the test to reach p < {ALPHA} at all (e.g. 3 and 3), "
            "the IQRs alone decide. Peak memory is one measurement per cell: its ratio has no noise estimate.",
        ),
        (
            "figure",
            "time_ratio",
            "Median time B / A per matched cell; hollow markers: within noise"
            + ("; crossed hollow markers: inconclusive (contended in A or B)" if len(vague) else "")
            + ".",
        ),
        ("table", table),
        *([("h2", "Inconclusive cells (contended)"), ("table", _inconclusive_table(vague, x))] if len(vague) else []),
        ("h2", "Commands"),
        ("code", f"A: {a.info.get('command', '?')}\nB: {b.info.get('command', '?')}"),
    ]
    _write_document(blocks, folder, f"compare {a.run_id} {b.run_id}")
    if echo is not None:
        for line in [summary, *inconclusive_lines]:
            echo(line)
