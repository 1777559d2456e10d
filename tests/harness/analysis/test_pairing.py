"""harness.analysis.pairing: the one way two runs are paired and their noise judged, and the proof that
`harness compare A B` and `harness check B --baseline A` pair exactly the same cells."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from harness import cli
from harness.analysis.pairing import (
    BEYOND,
    INCONCLUSIVE,
    KEY,
    TOO_FEW,
    UNFINISHED,
    WITHIN,
    comparable_rows,
    noise_test,
    pair_runs,
)
from harness.store.reader import load, load_run_info
from harness.store.schema import config_key
from harness.store.writer import RunStore
from tests.harness.report import report_fixtures as fx

# --------------------------------------------------------------------------- the noise test


@pytest.mark.parametrize("seed", range(5))
def test_the_noise_test_is_scipys_two_sided_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    a, b = list(rng.normal(10.0, 0.3, 12)), list(rng.normal(10.0 + 0.2 * seed, 0.3, 15))
    p, verdict = noise_test(a, b)
    reference = scipy_stats.mannwhitneyu(b, a, alternative="two-sided").pvalue
    assert p == pytest.approx(reference, rel=1e-9)
    assert verdict == (BEYOND if reference < 0.01 else WITHIN)


def test_too_few_repeats_are_never_judged():
    # the smallest two-sided p of n and m tie-free repeats is 2 / C(n + m, n)
    assert 2 / math.comb(6, 3) == pytest.approx(0.1) and 2 / math.comb(9, 4) > 0.01 > 2 / math.comb(10, 5)
    apart = ([1.0, 1.1, 1.2], [5.0, 5.1, 5.2])  # as far apart as samples can be
    assert noise_test(*apart) == (pytest.approx(0.1), TOO_FEW)
    assert noise_test([1.0, 1.1, 1.2, 1.3], [5.0, 5.1, 5.2, 5.3, 5.4])[1] == TOO_FEW  # 2 / 126 = 0.016
    p, verdict = noise_test([1.0, 1.1, 1.2, 1.3, 1.4], [5.0, 5.1, 5.2, 5.3, 5.4])  # 2 / 252 = 0.0079
    assert verdict == BEYOND and p == pytest.approx(2 / 252)
    assert noise_test([], [1.0, 2.0]) == (None, TOO_FEW)
    assert noise_test([1.0] * 6, [1.0] * 6) == (1.0, WITHIN)  # identical samples: no evidence


# --------------------------------------------------------------------------- pairing rows


def _row(variant: str, seq_len: int, median: float, **extra) -> dict:
    samples = [median * (1 + 0.01 * k) for k in (-2, -1, 0, 1, 2)] * 2  # 10 repeats around the median
    row = {"workload": "attention", "mode": "forward", "device": "cpu", "dtype": "float32", "seq_len": seq_len, "batch": 1}
    row |= {"variant": variant, "variant_label": variant, "variant_params": "{}", "status": "ok", "time_ms_median": median}
    row |= {"time_ms_samples": samples, "peak_mem_mib": 100.0, "cell_key": f"{variant}-{seq_len}-{median}"}
    return row | extra


def test_pairs_follow_the_identity_not_the_cell_key():
    a = pd.DataFrame(
        [
            _row("full", 512, 10.0),
            _row("full", 1024, 40.0),
            _row("full", 1024, 41.0, row_type="round", round=1),  # a round row: never paired
            _row("lsh", 512, 8.0, status="oom", time_ms_median=None, time_ms_samples=None),
            _row("sdpa", 512, 5.0),  # only in A
        ]
    )
    b = pd.DataFrame(
        [
            _row("full", 512, 10.0, code_version="other"),
            _row("full", 1024, 30.0),  # resumed with another code version: the row written last wins
            _row("full", 1024, 80.0, contended=True, contention="CPU share 0.40 < 0.85"),
            _row("lsh", 512, 8.0),
            _row("lsh", 2048, 20.0),  # only in B
        ]
    )
    pairing = pair_runs(a, b)
    keys = [p.key for p in pairing.pairs]
    assert keys == [config_key(r) for r in (a.iloc[0], a.iloc[1], a.iloc[3], a.iloc[4], b.iloc[4])]
    same, slower, unfinished, only_a, only_b = pairing.pairs
    assert (same.noise, same.ratio, same.p_value) == (WITHIN, 1.0, 1.0)
    assert slower.ratio == 2.0 and slower.noise == INCONCLUSIVE and slower.p_value is None  # B's last row, contended
    assert slower.contention() == {"b": "CPU share 0.40 < 0.85"}
    assert unfinished.noise == UNFINISHED and math.isnan(unfinished.ratio) and unfinished.matched
    assert only_a.b is None and only_b.a is None and [p.key for p in pairing.matched] == keys[:3]
    frame = pairing.frame()
    assert list(frame["status"]) == ["ok", "ok", "oom"] and list(frame["within_noise"]) == [True, None, None]
    assert list(frame["time_ms_median_b"][:2]) == [10.0, 80.0] and list(frame["inconclusive"]) == [False, True, False]


def test_a_quality_run_pairs_its_evaluations_and_its_failed_cells():
    base = {"kind": "quality", "workload": "model", "mode": "train_step", "device": "cpu", "dtype": "float32", "seq_len": 64}
    base |= {"batch": 8, "variant": "lsh", "variant_params": '{"n_hashes": 2}', "task_params": '{"name": "duplication"}'}
    rows = pd.DataFrame(
        [
            base | {"row_type": "curve", "cell_key": "k1-step00000010", "train_key": "k1", "step": 10, "status": "ok"},
            base | {"row_type": "eval", "cell_key": "k1-eval-a", "train_key": "k1", "eval_variant_name": "full", "status": "ok"},
            base | {"row_type": "eval", "cell_key": "k1-eval-b", "train_key": "k1", "eval_variant_name": "lsh", "status": "ok"},
            base | {"row_type": "train", "cell_key": "k1", "train_key": "k1", "status": "ok"},
            base | {"row_type": "train", "cell_key": "k2", "train_key": "k2", "seq_len": 128, "status": "error"},
        ]
    )
    rows["eval_variant_params"] = [None, "{}", '{"n_hashes": 2}', None, None]
    keyed = comparable_rows(rows)
    assert list(keyed["cell_key"]) == ["k1-eval-a", "k1-eval-b", "k2"] and keyed[KEY].nunique() == 3
    assert len(pair_runs(rows, rows).matched) == 3


# --------------------------------------------------------------------------- compare and check agree


def _store(root: Path, run_id: str, info: dict, rows: list[dict]) -> Path:
    store = RunStore(root, fx.SEQ_SUITE, run_id)
    store.write_run_info(info)
    for row in rows:
        store.append({k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))})
    store.fold()
    return store.path


def test_compare_and_check_pair_exactly_the_same_cells(tmp_path, capsys):
    """Run B is run A measured again with another code version: its sdpa cells are gone, lsh-1 is
    1.5x slower, lsh-8 was measured twice (a resume: the second row wins), there is a new length, and
    a cell of B was measured in rounds (its round rows are never paired). `harness compare A B` and
    `harness check B --baseline A` must name the same cells as paired, only in A and only in B."""
    root = tmp_path / "results"
    a = fx.seq_length_run(root)
    info = load_run_info(a)
    rows = load(a).to_dict("records")
    b_rows = []
    for row in rows:
        row = dict(row, code_version="v2", cell_key=row["cell_key"] + "v2")
        if row["variant"] == "sdpa":
            continue
        if row["variant_label"] == "lsh n_hashes=1" and row["status"] == "ok":
            samples = [s * 1.5 for s in row["time_ms_samples"]]
            row.update(time_ms_samples=samples, time_ms_median=float(np.median(samples)))
        if row["variant_label"] == "lsh n_hashes=8" and row["seq_len"] == 1024:
            b_rows.append(dict(row, cell_key=row["cell_key"] + "-r1", row_type="round", round=1, time_ms_median=1e6))
            b_rows.append(dict(row, cell_key=row["cell_key"] + "-old", peak_mem_mib=1e6))  # replaced by the next row
        b_rows.append(row)
    b_rows.append(dict(rows[-1], seq_len=65536, batch=1, cell_key="new-length", code_version="v2"))
    b = _store(root, "20260304T000000Z-again", info, b_rows)

    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "compare")]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    text = (tmp_path / "compare" / "report.md").read_text()
    table = [line.split(" | ") for line in text.split("| series | seq_len |")[1].split("\n\n")[0].splitlines()[2:]]
    compared = {(cells[0].strip("| "), int(cells[1])) for cells in table}

    assert cli.main(["check", str(b), "--baseline", str(a), "--root", str(root), "--format", "json"]) == 1  # the lsh-1 regressions
    data = json.loads(capsys.readouterr().out)
    labels = {c["config_key"]: c["cell"] for c in data["comparisons"] if c["metric"] != "cell"}

    def cell(label: str) -> tuple[str, int]:
        match = re.fullmatch(r"(.*) L=(\d+)(?: B=\d+)?", label)
        assert match, label
        return match.group(1), int(match.group(2))

    checked = {cell(label) for label in labels.values()}
    expected = {(s, n) for s in fx.SEQ_VARIANTS for n in fx.SEQ_LENS if s != "sdpa"}
    assert compared == checked == expected
    only_a, only_b = data["counts"]["missing"], data["counts"]["new"]
    assert (only_a, only_b) == (len(fx.SEQ_LENS), 1)
    assert f"{len(expected)} cells matched" in summary and f"{only_a} cell(s) only in A and {only_b} only in B" in summary
    # and they judge the pairs alike: lsh-1 is beyond noise in compare and a regression in check
    beyond = {(cells[0].strip("| "), int(cells[1])) for cells in table if cells[6].strip() == "NO"}
    regressions = {cell(c["cell"]) for c in data["comparisons"] if c["verdict"] == "regression"}
    assert beyond == regressions == {("lsh n_hashes=1", n) for n in fx.SEQ_LENS}
