"""Scaling fits: how time and peak memory grow along a sweep axis, per series."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from harness.analysis.series import is_log_axis, with_series
from harness.store.schema import PEAK_MEM_MIB, STATUS, STATUS_OK, TIME_MS_MEDIAN


def scaling_fits(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per series, least-squares fits over ok cells of time and peak memory against `x`.

    On a power-of-two axis: exponents k of metric ~ x^k (fit on log-log). Otherwise: slopes
    (ms and MiB per unit of x). Series with fewer than two distinct x values are left out.
    """
    log = is_log_axis(rows[x])
    frame = with_series(rows[rows[STATUS] == STATUS_OK], x)
    out = []
    for series in dict.fromkeys(frame["series"]):  # the order of the summary tables
        part = frame[frame["series"] == series]
        xs = pd.to_numeric(part[x], errors="coerce").to_numpy(float)
        if len(set(xs[np.isfinite(xs)])) < 2:
            continue
        entry: dict[str, Any] = {"series": series, "cells": len(part), "range": f"{xs.min():g}..{xs.max():g}"}
        for name, column in (("time", TIME_MS_MEDIAN), ("memory", PEAK_MEM_MIB)):
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
