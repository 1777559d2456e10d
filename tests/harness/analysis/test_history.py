"""harness.analysis.history, .comparison and .drift on runs at two code versions with a planted 1.5x
slowdown in one configuration (history_fixtures), and the drift model against independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import cli
from harness.analysis.catalog import find_runs
from harness.analysis.comparison import compare_runs
from harness.analysis.drift import CELLS, REPLICATES, drift_scale
from harness.analysis.history import METRICS, build_histories
from harness.analysis.pairing import BEYOND, bootstrap_interval, judge_log_ratio
from harness.analysis.stats import T3_MEDIAN_ABS, student_t3_quantile, student_t3_sf
from harness.store.reader import read_run
from tests.harness.analysis import history_fixtures as hx


@pytest.fixture(scope="module")
def history_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("history") / "results"
    hx.write_history(root)
    return root


def test_t3_and_the_drift_scale_match_scipy():
    for t in (0.0, 0.5, 2.0, 5.84):
        assert student_t3_sf(t) == pytest.approx(scipy_stats.t(3).sf(t), abs=1e-12)
    assert student_t3_quantile(0.975) == pytest.approx(scipy_stats.t(3).ppf(0.975), rel=1e-9)
    assert T3_MEDIAN_ABS == pytest.approx(scipy_stats.t(3).ppf(0.75), rel=1e-9)
    draws = scipy_stats.t(3).rvs(size=4001, random_state=np.random.default_rng(0)) * 0.05
    assert drift_scale(draws.tolist(), CELLS).scale == pytest.approx(0.05, rel=0.08)  # the MAD estimator recovers the scale
    assert drift_scale([0.1] * 7, CELLS).scale is None  # too few deviations


def test_the_bootstrap_interval_matches_scipy_and_is_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 0.05, 15).tolist(), (1.3 * rng.lognormal(0, 0.05, 15)).tolist()
    ratio = float(np.median(b) / np.median(a))
    (low, high), sd = bootstrap_interval(a, b, ratio)
    reference = scipy_stats.bootstrap(
        (np.array(a), np.array(b)),
        lambda x, y, axis: np.log(np.median(y, axis=axis) / np.median(x, axis=axis)),
        n_resamples=20000,
        method="percentile",
        paired=False,
        random_state=np.random.default_rng(2),
    )
    assert math.log(low) == pytest.approx(reference.confidence_interval.low, abs=0.02)
    assert math.log(high) == pytest.approx(reference.confidence_interval.high, abs=0.02)
    assert bootstrap_interval(a, b, ratio) == ((low, high), sd)  # the same seed, the same interval
    p, (lo, hi) = judge_log_ratio(math.log(1.3), 0.0, 0.05)
    assert p == pytest.approx(2 * scipy_stats.t(3).sf(math.log(1.3) / 0.05))
    assert math.log(hi) - math.log(1.3) == pytest.approx(scipy_stats.t(3).ppf(0.975) * 0.05)


def test_history_finds_the_planted_step_and_only_it(history_root):
    (history,) = build_histories(find_runs(history_root, "seq_length"), METRICS["time"])
    assert [v for v, _ in history.versions] == ["v1", "v2"] and [len(r) for _, r in history.versions] == [2, 2]
    assert history.drift.basis == REPLICATES and history.drift.scale == pytest.approx(hx.DRIFT_SD * math.sqrt(2), rel=0.5)
    assert len(history.steps) == 1, [(s.label, s.ratio) for s in history.steps]
    (step,) = history.steps
    assert step.label == f"{hx.PLANTED[0]} seq_len={hx.PLANTED[1]}" and step.worse and (step.before, step.after) == ("v1", "v2")
    assert step.interval[0] < hx.PLANTED_RATIO < step.interval[1] and step.p_value < 0.01
    assert history.latest_worse == [step]


def test_no_step_without_a_planted_change(tmp_path):
    hx.write_history(tmp_path / "results", planted=False)
    (history,) = build_histories(find_runs(tmp_path / "results", "seq_length"), METRICS["time"])
    assert history.steps == [] and history.drift.scale is not None


def test_compare_of_three_runs_has_intervals_around_the_planted_ratio(history_root):
    runs = [read_run(history_root / "seq_length" / run_id, history_root) for run_id, _, _ in hx.RUNS[:3]]
    multi = compare_runs(runs)
    assert [v.run.run_id for v in multi.others] == [hx.RUNS[1][0], hx.RUNS[2][0]]
    same, changed = (v.frame() for v in multi.others)
    assert all(v.drift.basis == REPLICATES for v in multi.others)  # two runs of v1 among the three
    ok = same[same["status"] == "ok"]
    assert not (ok["noise"] == BEYOND).any()  # two runs of the same code never read as different
    planted = (changed["variant_label"] == hx.PLANTED[0]) & (changed["seq_len"] == hx.PLANTED[1])
    row = changed[planted].iloc[0]
    assert row["ci_low"] < hx.PLANTED_RATIO < row["ci_high"] and row["noise"] == BEYOND
    others = changed[~planted & (changed["status"] == "ok")]
    assert not (others["noise"] == BEYOND).any()
    assert ((others["ci_low"] < 1) & (others["ci_high"] > 1)).mean() >= 0.9  # 95% intervals: about all contain no change


def test_check_prints_the_interval_beside_each_ratio(history_root, capsys):
    base, now = (history_root / "seq_length" / hx.RUNS[i][0] for i in (0, 2))
    args = ["check", str(now), "--baseline", str(base), "--root", str(history_root)]
    assert cli.main([*args, "--format", "json"]) == 1  # the planted slowdown is a regression
    data = json.loads(capsys.readouterr().out)
    planted = [c for c in data["comparisons"] if c["cell"].startswith(f"{hx.PLANTED[0]} L={hx.PLANTED[1]}") and c["metric"] == "time_ms"]
    (comparison,) = planted
    low, high = comparison["interval"]
    assert low < comparison["ratio"] < high and comparison["verdict"] == "regression"
    cli.main(args)
    line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{hx.PLANTED[0]} L={hx.PLANTED[1]}") and "time_ms" in line
    )
    assert f"x [{low:.3f}-{high:.3f}]" in line
