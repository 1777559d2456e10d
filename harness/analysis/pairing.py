"""One way to pair two runs: `pair_runs(a, b)` matches their cells by identity and judges each pair.

Identity (`comparable_rows`, the one identity of harness.store.schema): a benchmark run's cells (a
cell measured in rounds: its combined row, not its rounds) are keyed by `schema.config_key`, the
configuration without code version, labels or measure settings; a quality run's evaluations (its
`eval` rows, plus the `train` row of a cell that failed before evaluating) by `schema.quality_key`.
When a key occurs twice in one run (a run resumed with another code version), the row written
last wins.

Every key present in either run is one `Pair` (the side that lacks the cell is None). A pair whose
cells finished (`ok`) in both runs carries the median time ratio B / A, the peak memory ratio B / A,
the per-repeat timing samples of both and one noise verdict, by one rule (docs/decisions.md, "One
noise rule"):

- INCONCLUSIVE when either cell's timing stayed contended (other load disturbed it): neither within
  noise nor beyond it;
- TOO_FEW when a side has no samples, or the repeats are too few for the test to reach p < alpha at
  all (3 and 3 repeats: the smallest two-sided p is 0.1);
- BEYOND (beyond noise) when a two-sided Mann-Whitney U test on the two sets of samples
  (`harness.analysis.stats`) gives p < alpha (NOISE_ALPHA, 0.01), WITHIN otherwise.

Each finished pair also carries a 95% interval of its time ratio: a seeded bootstrap over both sides'
samples (`bootstrap_log_ratios`), and the bootstrap's spread of the log ratio. That judges one run
against another within the runs' own spread; across runs, `judge_pair` adds the between-run drift
(harness.analysis.drift): a calibration offset and a drift scale, and says which it used.

A pair where either cell did not finish is UNFINISHED, without ratios. `harness compare` renders the
pairs (harness.report.compare_report); `harness check` judges them with its thresholds on top
(harness.check.regression). Nothing here knows about either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from harness.analysis.stats import (
    BOOTSTRAP_SEED,
    NOISE_ALPHA,
    bootstrap_log_ratios,
    mann_whitney_u,
    median,
    min_p_value,
    quantile,
    student_t3_quantile,
    student_t3_sf,
)
from harness.analysis.tables import row_contended
from harness.safe_io import InputFileError, parse_json
from harness.store.schema import (
    CONFIG_COLUMNS,
    CONFIG_KEY,
    CONTENDED,
    CONTENTION,
    MODEL_COLUMNS,
    PEAK_MEM_MIB,
    STATUS,
    STATUS_OK,
    TIME_MS_IQR,
    TIME_MS_MEDIAN,
    TIME_MS_SAMPLES,
    VARIANT_PARAMS,
    split,
)

KEY = CONFIG_KEY  # the identity column `comparable_rows` adds
WITHIN, BEYOND, TOO_FEW, INCONCLUSIVE, UNFINISHED = "within noise", "beyond noise", "too few repeats", "inconclusive", "unfinished"
NOISE_VERDICTS = (WITHIN, BEYOND, TOO_FEW, INCONCLUSIVE, UNFINISHED)
# The per-cell columns a paired frame carries from both runs, as <column>_a and <column>_b.
PAIRED_COLUMNS = (STATUS, TIME_MS_MEDIAN, TIME_MS_IQR, TIME_MS_SAMPLES, PEAK_MEM_MIB, CONTENDED, CONTENTION)
INTERVAL_LEVEL = 0.95  # the intervals shown beside ratios
WITHIN_RUN = "within-run spread"  # the basis of a judgement without between-run drift
T3_INTERVAL = student_t3_quantile(0.5 + INTERVAL_LEVEL / 2)  # 3.18: half-width of a 95% t3 interval, in scales


# --------------------------------------------------------------------------- identity


def comparable_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a run that a comparison reads, each with its identity in KEY, one row per key (the
    last written wins): `harness.store.schema.split(frame).keyed()`. A benchmark run: one row per
    cell (a cell measured in rounds: its combined row), keyed by `config_key`, recomputed from the
    configuration columns so that runs stored before the column existed match too. A quality run:
    its `eval` rows plus the `train` row of each training cell that stored no eval row (it failed:
    its status is what is compared), keyed by `quality_key`; its learning-curve rows are not
    compared."""
    return split(frame).keyed().drop_duplicates(KEY, keep="last").reset_index(drop=True)


def configuration_differences(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """The configuration columns (those of `config_key`) whose sets of values differ between two
    runs' rows: why nothing pairs, in words."""
    columns = [*CONFIG_COLUMNS, VARIANT_PARAMS, *MODEL_COLUMNS]
    return [c for c in columns if c in a and c in b and set(a[c].astype(str)) != set(b[c].astype(str))]


# --------------------------------------------------------------------------- samples and the noise test


def finite(value: Any) -> float | None:
    """`value` as a finite float, else None (missing, NaN, not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def samples_of(row: dict, column: str = TIME_MS_SAMPLES) -> list[float]:
    """The per-repeat values of a row in `column` (a list, an array or JSON text; finite values
    only); [] when it has none."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            value = parse_json(value, column)
        except InputFileError:
            return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return []
    return [float(v) for v in value if finite(v) is not None]


def noise_test(a: Sequence[float], b: Sequence[float], alpha: float = NOISE_ALPHA) -> tuple[float | None, str]:
    """(two-sided Mann-Whitney U p-value, verdict) of two sets of samples: BEYOND when p < alpha,
    WITHIN otherwise, TOO_FEW when a set is empty or the sizes cannot reach p < alpha at all (the
    p-value is still given where both sets have values)."""
    if not a or not b:
        return None, TOO_FEW
    p = mann_whitney_u(b, a, alternative="two-sided").pvalue
    if 2 * min_p_value(len(a), len(b)) >= alpha:
        return p, TOO_FEW
    return p, BEYOND if p < alpha else WITHIN


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One identity `key` of two runs: its row in A and in B (None where that run lacks it), the
    ratios B / A (NaN unless both finished), both sides' timing samples (ms), the noise test's
    p-value and verdict (one of NOISE_VERDICTS)."""

    key: str
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    ratio: float = math.nan
    memory_ratio: float = math.nan
    samples_a: tuple[float, ...] = ()
    samples_b: tuple[float, ...] = ()
    p_value: float | None = None
    noise: str = UNFINISHED
    interval: tuple[float, float] = (math.nan, math.nan)
    log_sd: float = math.nan

    @property
    def matched(self) -> bool:
        """Both runs have the cell."""
        return self.a is not None and self.b is not None

    @property
    def finished(self) -> bool:
        """Both runs have the cell and it finished (`ok`) in both."""
        return self.matched and self.a.get(STATUS) == STATUS_OK and self.b.get(STATUS) == STATUS_OK  # type: ignore[union-attr]

    def contention(self) -> dict[str, str]:
        """Side ("a", "b") -> the reason its timing stayed contended, for the contended sides."""
        sides = (("a", self.a), ("b", self.b))
        return {side: str(row.get(CONTENTION) or CONTENDED) for side, row in sides if row is not None and row_contended(row)}


def _median_time(row: dict, samples: Sequence[float]) -> float:
    """The cell's median time (ms): its `time_ms_median`, else the median of its samples."""
    value = finite(row.get(TIME_MS_MEDIAN))
    return value if value is not None else median(samples)


def pair_cells(key: str, a: dict | None, b: dict | None, alpha: float = NOISE_ALPHA) -> Pair:
    """The Pair of one identity: ratios and the noise verdict when both cells finished."""
    if a is None or b is None or a.get(STATUS) != STATUS_OK or b.get(STATUS) != STATUS_OK:
        return Pair(key, a, b)
    samples_a, samples_b = samples_of(a), samples_of(b)
    time_a, time_b = _median_time(a, samples_a), _median_time(b, samples_b)
    memory_a, memory_b = finite(a.get(PEAK_MEM_MIB)), finite(b.get(PEAK_MEM_MIB))
    ratio = time_b / time_a if math.isfinite(time_a) and time_a > 0 and math.isfinite(time_b) else math.nan
    memory_ratio = memory_b / memory_a if memory_a and memory_b is not None else math.nan
    if row_contended(a) or row_contended(b):
        p, noise = None, INCONCLUSIVE
    else:
        p, noise = noise_test(samples_a, samples_b, alpha)
    interval, log_sd = bootstrap_interval(samples_a, samples_b, ratio)
    return Pair(key, a, b, ratio, memory_ratio, tuple(samples_a), tuple(samples_b), p, noise, interval, log_sd)


def bootstrap_interval(
    a: Sequence[float], b: Sequence[float], ratio: float, seed: int = BOOTSTRAP_SEED
) -> tuple[tuple[float, float], float]:
    """((low, high), sd of the log ratio) of the ratio of medians B / A: the INTERVAL_LEVEL percentile
    interval of a seeded bootstrap over both sides' samples, shifted so that it surrounds `ratio` (the
    stored medians' ratio, which a combined round row may take from its rounds); NaNs without samples."""
    replicates = bootstrap_log_ratios(a, b, seed)
    if not replicates or not math.isfinite(ratio) or ratio <= 0:
        return (math.nan, math.nan), math.nan
    centre = math.log(median(b) / median(a))
    shift = math.log(ratio) - centre
    tail = (1 - INTERVAL_LEVEL) / 2
    low, high = quantile(replicates, tail), quantile(replicates, 1 - tail)
    mean = sum(replicates) / len(replicates)
    sd = math.sqrt(sum((r - mean) ** 2 for r in replicates) / max(len(replicates) - 1, 1))
    return (math.exp(low + shift), math.exp(high + shift)), sd


@dataclass(frozen=True)
class Judgement:
    """A pair judged across runs: the (calibrated) ratio, its INTERVAL_LEVEL interval, the p-value and
    verdict (NOISE_VERDICTS) and `basis`: what the interval and verdict account for, in words."""

    ratio: float
    interval: tuple[float, float]
    p_value: float | None
    noise: str
    basis: str


def judge_log_ratio(log_ratio: float, log_sd: float, scale: float, alpha: float = NOISE_ALPHA) -> tuple[float, tuple[float, float]]:
    """(two-sided p, interval) of a calibrated log ratio against no change, when the between-run drift
    is a t with 3 df of `scale` and the within-run error has sd `log_sd` (added in quadrature)."""
    spread = math.hypot(scale, log_sd if math.isfinite(log_sd) else 0.0)
    p = min(1.0, 2 * student_t3_sf(abs(log_ratio) / spread))
    return p, (math.exp(log_ratio - T3_INTERVAL * spread), math.exp(log_ratio + T3_INTERVAL * spread))


def judge_pair(
    pair: Pair, offset: float = 0.0, scale: float | None = None, basis: str = WITHIN_RUN, alpha: float = NOISE_ALPHA
) -> Judgement:
    """Judge a pair across runs: its ratio with the calibration `offset` taken out (log(B / A) - offset);
    with a drift `scale` (harness.analysis.drift), p and interval from `judge_log_ratio` and BEYOND when
    p < alpha and the within-run test does not say WITHIN; without one, the pair's own bootstrap
    interval and within-run verdict. Contended and unfinished pairs keep their verdicts."""
    if not pair.finished or not math.isfinite(pair.ratio) or pair.ratio <= 0:
        return Judgement(math.nan, (math.nan, math.nan), None, pair.noise, basis)
    factor = math.exp(-offset)
    ratio = pair.ratio * factor
    if scale is None:
        low, high = pair.interval
        return Judgement(ratio, (low * factor, high * factor), pair.p_value, pair.noise, basis)
    p, interval = judge_log_ratio(math.log(ratio), pair.log_sd, scale, alpha)
    if pair.noise in (INCONCLUSIVE, UNFINISHED):
        noise = pair.noise
    elif not pair.samples_a or not pair.samples_b:
        noise = TOO_FEW
    else:
        noise = BEYOND if p < alpha and pair.noise != WITHIN else WITHIN
    return Judgement(ratio, interval, p, noise, basis)


@dataclass(frozen=True)
class Pairing:
    """The pairs of two runs, A's keys in A's order, then those only B has; `alpha` of the noise test."""

    pairs: tuple[Pair, ...]
    alpha: float = NOISE_ALPHA

    @property
    def matched(self) -> list[Pair]:
        """The pairs whose cell both runs have."""
        return [p for p in self.pairs if p.matched]

    @property
    def only_a(self) -> list[Pair]:
        """The pairs whose cell only run A has."""
        return [p for p in self.pairs if p.b is None]

    @property
    def only_b(self) -> list[Pair]:
        """The pairs whose cell only run B has."""
        return [p for p in self.pairs if p.a is None]

    def frame(self) -> pd.DataFrame:
        """One row per matched pair: A's row (its configuration columns as they are), PAIRED_COLUMNS
        from both runs as `<column>_a` / `<column>_b`, `ratio`, `memory_ratio`, `p_value` (NaN when
        untested), `ci_low` / `ci_high` (the bootstrap interval of `ratio`),
        `noise`, `within_noise` (True / False, None unless WITHIN or BEYOND),
        `inconclusive` and `status` (ok when both finished, else the first failure: "oom" ...)."""
        records = []
        for pair in self.matched:
            record = {k: v for k, v in pair.a.items() if k not in PAIRED_COLUMNS}  # type: ignore[union-attr]
            for column in PAIRED_COLUMNS:
                record[f"{column}_a"] = pair.a.get(column)  # type: ignore[union-attr]
                record[f"{column}_b"] = pair.b.get(column)  # type: ignore[union-attr]
            status_a, status_b = record["status_a"], record["status_b"]
            record.update(
                ratio=pair.ratio,
                memory_ratio=pair.memory_ratio,
                p_value=np.nan if pair.p_value is None else pair.p_value,
                ci_low=pair.interval[0],
                ci_high=pair.interval[1],
                noise=pair.noise,
                within_noise={WITHIN: True, BEYOND: False}.get(pair.noise),
                inconclusive=pair.noise == INCONCLUSIVE,
                status=status_a if status_a != STATUS_OK else status_b,
            )
            records.append(record)
        return pd.DataFrame(records)


def pair_runs(a: pd.DataFrame, b: pd.DataFrame, alpha: float = NOISE_ALPHA) -> Pairing:
    """Pair the cells of two runs' rows (as stored: `comparable_rows` is applied here) by identity.

    a: the reference run (a baseline, run A of a comparison), b: the other; ratios are B / A.
    `alpha`: significance level of the noise test (`noise_test`)."""
    rows_a = {r[KEY]: r for r in comparable_rows(a).to_dict("records")}
    rows_b = {r[KEY]: r for r in comparable_rows(b).to_dict("records")}
    keys: Iterable[str] = [*rows_a, *(k for k in rows_b if k not in rows_a)]
    return Pairing(tuple(pair_cells(k, rows_a.get(k), rows_b.get(k), alpha) for k in keys), alpha)
