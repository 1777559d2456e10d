"""harness.report.compare_report: `harness compare A B` renders the pairs of harness.analysis.pairing.

The runs are the synthetic seq_length run of report_fixtures (11 repeats per cell), its layers_memory
run (3 repeats per cell) and a disturbed copy of seq_length with two contended cells (conftest.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from harness import cli
from harness.analysis.pairing import TOO_FEW, configuration_differences, pair_runs
from harness.report.compare_report import render_compare
from harness.report.folders import open_run
from harness.store.files import ResultsError
from harness.store.reader import load


def test_compare_with_itself_is_one_and_within_noise(seq, tmp_path):
    rows = open_run(seq).rows
    frame = pair_runs(rows, rows).frame()
    assert len(frame) == len(rows)
    ok = frame[frame["status_a"] == "ok"]
    assert np.allclose(ok["ratio"], 1.0) and np.allclose(ok["memory_ratio"], 1.0)
    assert ok["within_noise"].eq(True).all() and (ok["p_value"] == 1.0).all()  # identical samples: no evidence at all
    assert frame.loc[frame["status_a"] == "oom", "within_noise"].isna().all() and (frame["status_a"] == "oom").sum() == 1
    folder = render_compare(seq, seq, out=tmp_path / "seq")
    text = (folder / "report.md").read_text()
    assert (folder / "time_ratio.png").stat().st_size > 1000 and (folder / "time_ratio.svg").exists()
    assert "| NO |" not in text and "0 of them differ beyond noise" in text and "| too few repeats |" not in text


def test_three_repeats_are_too_few_to_judge(layers, tmp_path):
    """3 and 3 repeats: the smallest two-sided Mann-Whitney p is 2 / C(6, 3) = 0.1, so the test can never
    reach p < 0.01 and the cell is neither within noise nor beyond it (the check calls it untested)."""
    rows = open_run(layers).rows
    frame = pair_runs(rows, rows).frame()
    assert (frame["noise"] == TOO_FEW).all() and frame["within_noise"].isna().all()
    assert frame["p_value"].eq(1.0).all() and np.allclose(frame["ratio"], 1.0)
    # across runs, a drift scale needs at least 8 deviations: with 12 cells that agree, the cells' spread gives
    # one (zero here) and every cell is judged on the interval instead; with fewer cells the within-run verdict stands
    lines: list[str] = []
    text = (render_compare(layers, layers, out=tmp_path / "layers", echo=lines.append) / "report.md").read_text()
    assert "12 finished in both, 0 of them differ beyond noise." in lines[0] and "from 12 log ratios between all cells" in lines[0]
    assert text.count("| too few repeats |") == 0 and text.count("| yes |") == len(rows)
    few = tmp_path / "layers_memory" / "20260301T130000Z-few"
    few.mkdir(parents=True)
    (few / "run.json").write_text((layers / "run.json").read_text())
    rows.head(5).to_parquet(few / "results.parquet", index=False)
    lines.clear()
    text = (render_compare(few, few, out=tmp_path / "few", echo=lines.append) / "report.md").read_text()
    assert "5 with too few repeats for the test to tell" in lines[0] and "within-run spread only" in lines[0]
    assert text.count("| too few repeats |") == 5 and "no marker: too few repeats to tell" in text


def test_compare_flags_a_real_slowdown_and_matches_on_config_not_cell_key(seq, tmp_path):
    rows = open_run(seq).rows
    slower = rows.copy()
    lsh = slower["variant"] == "lsh"
    slower.loc[lsh, "time_ms_median"] *= 1.5
    slower["time_ms_samples"] = [
        list(np.asarray(s) * (1.5 if is_lsh else 1.0)) if s is not None else None for s, is_lsh in zip(slower["time_ms_samples"], lsh)
    ]
    slower["cell_key"] = slower["cell_key"] + "x"  # another code version: other keys, same configs
    slower["code_version"] = "other"
    frame = pair_runs(rows, slower).frame()
    assert len(frame) == len(rows)
    changed = frame[(frame["variant"] == "lsh")]
    assert np.allclose(changed["ratio"], 1.5) and changed["within_noise"].eq(False).all()
    same = frame[(frame["variant"] != "lsh") & (frame["status_a"] == "ok")]
    assert same["within_noise"].eq(True).all()
    # nothing in common: no pairs, and the message says which configuration columns differ
    other = rows.assign(dtype="float16")
    assert not pair_runs(rows, other).matched and configuration_differences(rows, other) == ["dtype"]
    copy = tmp_path / "seq_length" / "20260303T000000Z-fp16"
    shutil.copytree(seq, copy)
    shutil.rmtree(copy / "cells", ignore_errors=True)
    load(seq).assign(dtype="float16").to_parquet(copy / "results.parquet", index=False)
    with pytest.raises(ResultsError, match=r"no cells with the same configuration \(they differ in: dtype\)"):
        render_compare(seq, copy, out=tmp_path / "none")
    assert cli.main(["compare", str(seq), str(copy), "--out", str(tmp_path / "none")]) == 2


def test_compare_treats_a_contended_cell_as_inconclusive(seq, disturbed, tmp_path):
    lines: list[str] = []
    folder = render_compare(seq, disturbed, out=tmp_path / "compare", echo=lines.append)
    frame = pair_runs(open_run(seq).rows, open_run(disturbed).rows).frame()
    vague = frame[frame["inconclusive"]]
    assert sorted(vague["seq_len"]) == [1024, 2048] and vague["within_noise"].isna().all() and vague["p_value"].isna().all()
    assert frame.loc[~frame["inconclusive"] & (frame["status"] == "ok"), "within_noise"].eq(True).all()
    assert "0 of them differ beyond noise, 2 inconclusive: contended in A or B" in lines[0]
    assert lines[1].startswith("inconclusive: lsh n_hashes=1 seq_len=1024: B CPU share 0.50")
    text = (folder / "report.md").read_text()
    assert text.count("inconclusive (contended)") == 2 and "## Inconclusive cells (contended)" in text
    assert 'id="contended-lsh-n_hashes-1-1024"' in (folder / "time_ratio.svg").read_text()


def test_compare_names_both_runs_relative_to_the_working_directory(seq, tmp_path, monkeypatch):
    monkeypatch.chdir(seq.parents[1])  # the results root: the runs are named from there
    text = (render_compare(seq, seq, out=tmp_path / "rel") / "report.md").read_text()
    assert f"A: `seq_length/{seq.name}`" in text and f"B: `seq_length/{seq.name}`" in text
    assert str(tmp_path) not in text.split("## Commands")[0]
