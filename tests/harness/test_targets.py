"""harness.targets: absolute targets within one run (`checks: targets:`, `harness check --targets`)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from harness.check_rules import ChecksError, TargetRule, parse_checks
from harness.store.files import ResultsError
from harness.targets import evaluate_targets, format_targets


def row(variant, n_hashes, seq_len, time_ms, mem, status="ok", floor_ratio=math.nan):
    return {
        "variant": variant,
        "variant_label": f"{variant} n_hashes={n_hashes}",
        "n_hashes": n_hashes,
        "seq_len": seq_len,
        "batch": 1,
        "time_ms_median": time_ms,
        "peak_mem_mib": mem,
        "status": status,
        "floor_ratio": floor_ratio,
    }


FRAME = pd.DataFrame(
    [
        row("lsh", 8, 4096, 400.0, 100.0, floor_ratio=1.2),
        row("lsh", 8, 16384, 2000.0, 300.0, floor_ratio=1.6),
        row("lsh", 8, 65536, 9000.0, 1200.0),
        row("hf", 8, 16384, 6000.0, 900.0),
        row("slow_peer", 8, 16384, 12000.0, 200.0),  # less memory, but not the fastest peer
        row("lsh", 1, 16384, 500.0, 100.0),
        row("hf", 1, 16384, 700.0, 150.0),
        row("oom_peer", 1, 16384, math.nan, math.nan, status="oom"),
    ]
)
PEERS = "variant in ['hf', 'slow_peer', 'oom_peer']"


def evaluate(**rule):
    return evaluate_targets(FRAME, [TargetRule(**rule)])


def test_speedup_against_the_fastest_ok_peer():
    table = evaluate(
        numerator="variant == 'lsh'", denominator=PEERS, at="seq_len == 16384", match_on=["seq_len", "batch", "n_hashes"], max=0.5
    )
    values = dict(zip(table["cell"], table["value"]))
    assert values["lsh n_hashes=8 L=16384 B=1"] == pytest.approx(2000 / 6000)  # hf, not slow_peer
    assert values["lsh n_hashes=1 L=16384 B=1"] == pytest.approx(500 / 700)  # the OOM peer is ignored
    assert list(table["met"]) == [True, False]
    assert set(table["denominator"]) == {"hf n_hashes=8 L=16384", "hf n_hashes=1 L=16384"}


def test_memory_is_compared_with_the_fastest_peer_not_the_leanest():
    table = evaluate(
        numerator="variant == 'lsh' and n_hashes == 8",
        denominator=PEERS,
        at="seq_len == 16384",
        match_on=["seq_len", "batch", "n_hashes"],
        metric="peak_mem",
        max=1.0,
    )
    assert table["value"].tolist() == [pytest.approx(300 / 900)] and table["met"].all()


def test_activation_memory_across_depth():
    """The layers_memory claim: activations at 12 layers over those at 1 (rows by hand: the state grows
    with depth, the activations of the reversible stack do not); rows without the column fall back
    to their peak_mem."""
    depth = pd.DataFrame(
        [
            {"variant": "lsh", "variant_label": f"{r} {n}", "residual": r, "n_layers": n, "seq_len": 4096, "batch": 1}
            | {"time_ms_median": 100.0 * n, "peak_mem_mib": peak, "activation_mem_mib": peak, "status": "ok"}
            for r, n, peak in (("reversible", 1, 128.0), ("reversible", 12, 130.0), ("standard", 1, 129.0), ("standard", 12, 950.0))
        ]
    )
    rule = {"denominator": "n_layers == 1 and residual == 'reversible'", "match_on": ["seq_len"], "metric": "activation_mem"}
    flat = evaluate_targets(depth, [TargetRule(numerator="n_layers == 12 and residual == 'reversible'", max=1.3, **rule)])
    assert flat["value"].tolist() == [pytest.approx(130 / 128)] and flat["met"].all()
    old_rows = depth.drop(columns="activation_mem_mib").assign(peak_mem_mib=[128.0, 200.0, 129.0, 950.0])
    grown = evaluate_targets(old_rows, [TargetRule(numerator="n_layers == 12 and residual == 'reversible'", max=1.3, **rule)])
    assert grown["value"].tolist() == [pytest.approx(200 / 128)] and not grown["met"].any()


def test_time_per_token_against_another_length_and_floor_ratio_alone():
    table = evaluate(
        numerator="variant == 'lsh' and n_hashes == 8",
        denominator="variant == 'lsh' and seq_len == 4096",
        at="seq_len == 65536",
        match_on=["batch", "n_hashes"],
        metric="time_per_token",
        max=1.3,
    )
    assert table["value"].tolist() == [pytest.approx((9000 / 65536) / (400 / 4096))]
    assert not table["met"].any()  # 1.41 > 1.3
    floors = evaluate(numerator="variant == 'lsh' and n_hashes == 8 and seq_len <= 16384", metric="floor_ratio", max=1.5)
    assert floors["value"].tolist() == [1.2, 1.6] and floors["met"].tolist() == [True, False]


def test_unmeasurable_targets_are_missed_not_passed():
    no_peer = evaluate(
        numerator="variant == 'lsh' and seq_len == 4096", denominator=PEERS, match_on=["seq_len", "batch", "n_hashes"], max=10.0
    )
    assert no_peer["note"].tolist() == ["no ok denominator cell"] and not no_peer["met"].any()
    failed = evaluate(numerator="variant == 'oom_peer'", max=10.0)
    assert failed["note"].tolist() == ["numerator oom"] and not failed["met"].any()
    nothing = evaluate(numerator="variant == 'absent'", max=1.0)
    assert nothing["note"].tolist() == ["no numerator cell in this run"] and not nothing["met"].any()
    assert "1 missed" in format_targets(nothing, "test") and "MISSED" in format_targets(nothing, "test")


def test_bad_rules_give_clear_errors():
    with pytest.raises(ResultsError, match="no_such_column"):
        evaluate(numerator="no_such_column == 1", max=1.0)
    with pytest.raises(ChecksError, match=r"checks\.targets\.0\.maximum: unknown key 'maximum'; allowed keys: .*max"):
        parse_checks({"targets": [{"numerator": "variant == 'lsh'", "maximum": 1.0}]})
    with pytest.raises(ChecksError, match="metric"):
        parse_checks({"targets": [{"numerator": "variant == 'lsh'", "metric": "speed"}]})


def test_bpd_target_over_a_quality_runs_evaluations(tmp_path):
    from harness.check import load_run_data
    from tests.harness.test_check import QUALITY_BPD, quality_run

    run = load_run_data(quality_run(tmp_path, "run", QUALITY_BPD), tmp_path)
    rule = TargetRule(
        numerator="variant_label == 'LSH-2'",
        denominator="variant_label == 'full'",
        at="eval_variant == train_variant",  # LSH-2 evaluated with its own attention, not with full
        match_on=["seq_len"],
        metric="bpd",
        max=1.05,
    )
    table = evaluate_targets(run.rows, [rule])
    assert table["cell"].tolist() == ["LSH-2 L=128"] and table["denominator"].tolist() == ["full L=128"]
    assert table["value"].iloc[0] == pytest.approx(3.0 / 2.9) and bool(table["met"].iloc[0])
    strict = evaluate_targets(run.rows, [rule.model_copy(update={"max": 1.0})])
    assert not bool(strict["met"].iloc[0])
