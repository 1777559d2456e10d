"""harness.report / harness.figures: reports and comparisons rendered from stored results.

The data are two real H100 runs copied into tests/data/results (run.json + results.parquet):
seq_length (one attention layer at 32K tokens/step; full attention OOMs at 32K) and
layers_memory (Reformer LM training memory against depth, standard vs reversible).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from harness import cli, figures, runner
from harness.report import (
    compare_runs,
    open_run,
    render_compare,
    render_report,
    scaling_fits,
    summary_tables,
    sweep_axes,
    with_series,
)
from harness.results import PARQUET, ResultsError, load, rows_to_parquet_bytes
from harness.tables import pivot_metric

DATA = Path(__file__).resolve().parents[1] / "data" / "results"
SEQ = DATA / "seq_length" / "20261122T234611Z-nvidia-h100-80gb-hbm3"
LAYERS = DATA / "layers_memory" / "20261122T234954Z-nvidia-h100-80gb-hbm3"
SEQ_FIGURES = ("time_vs_seq_len", "memory_vs_seq_len", "tokens_per_s_vs_seq_len")
LAYERS_FIGURES = ("memory_vs_n_layers", "time_vs_n_layers")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Both runs rendered once into a temporary folder; returns that folder."""
    out = tmp_path_factory.mktemp("reports")
    index = render_report([SEQ, LAYERS], out=out)
    assert index == out / "index.html"
    return out


def _md_table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in markdown.splitlines() if line.startswith("| ")]


def test_report_writes_every_figure_and_document(rendered):
    for run, stems, absent in ((SEQ, SEQ_FIGURES, LAYERS_FIGURES), (LAYERS, LAYERS_FIGURES, SEQ_FIGURES)):
        folder = rendered / run.parent.name / run.name
        for stem in stems:
            for suffix in (".png", ".svg"):
                assert (folder / f"{stem}{suffix}").stat().st_size > 1000, f"{stem}{suffix}"
            assert f"({stem}.png)" in (folder / "report.md").read_text()
        for stem in absent:  # figures follow the columns that vary, not the suite
            assert not (folder / f"{stem}.png").exists()
        assert (folder / "index.html").stat().st_size > 10_000
    index = (rendered / "index.html").read_text()
    assert f"seq_length/{SEQ.name}/index.html" in index and f"layers_memory/{LAYERS.name}/index.html" in index


def test_report_states_environment_command_and_units(rendered):
    text = (rendered / "seq_length" / SEQ.name / "report.md").read_text()
    info = json.loads((SEQ / "run.json").read_text())
    assert info["command"] in text
    for fact in ("NVIDIA H100 80GB HBM3", "580.159.04", "2.11.0+cu130", "nocommit+dirty.173260f8", "threads (torch) | 16"):
        assert fact in text
    assert "median time per step (ms)" in text and "peak memory (MiB)" in text
    assert "32,768" in text  # constant tokens per step stated with the exponents


def test_summary_tables_hold_the_parquet_values(rendered):
    rows = load(SEQ)
    tables = summary_tables(rows)
    time = tables["median time per step (ms), by seq_len"]
    memory = tables["peak memory (MiB), by seq_len"]
    labelled = with_series(rows, "seq_len")
    for _, row in labelled.iterrows():
        if row["status"] == "ok":
            assert time.loc[row["series"], row["seq_len"]] == f"{row['time_ms_median']:.4g}"
            assert memory.loc[row["series"], row["seq_len"]] == f"{row['peak_mem_mib']:.1f}"
        else:
            assert time.loc[row["series"], row["seq_len"]] == row["status"].upper()
    assert time.loc["full", 32768] == "OOM"
    # and report.md shows exactly these tables
    md_rows = _md_table_rows((rendered / "seq_length" / SEQ.name / "report.md").read_text())
    for table in (time, memory):
        for series, values in table.iterrows():
            assert [series, *values] in md_rows


def test_layers_tables_and_fits(rendered):
    rows = load(LAYERS)
    assert sweep_axes(rows) == ["n_layers"]
    memory = summary_tables(rows)["peak memory (MiB), by n_layers"]
    value = rows[(rows["residual"] == "standard") & (rows["n_layers"] == 12)]["peak_mem_mib"].iloc[0]
    assert memory.loc["lsh residual=standard", 12] == f"{value:.1f}"
    fits = scaling_fits(rows, "n_layers").set_index("series")
    # standard residuals keep every layer's activations; reversible ones do not
    assert fits.loc["lsh residual=standard", "memory"] > 500
    assert abs(fits.loc["lsh residual=reversible", "memory"]) < 10


def test_time_over_compute_floor_table_and_figure(rendered, tmp_path):
    # The H100 seq_length run as if its suite had `matmul_rate: true`: a matmul rate per cell, and
    # the floor columns the runner derives from it.
    rows = load(SEQ)
    rows["matmul_gflops"] = np.linspace(380_000.0, 420_000.0, len(rows))
    rows["matmul_n"] = 8192
    floors = pd.DataFrame([runner.floor_columns(r) for r in rows.to_dict("records")], index=rows.index)
    rows = rows.join(floors)
    run = tmp_path / "results" / "seq_length" / SEQ.name
    run.mkdir(parents=True)
    shutil.copy(SEQ / "run.json", run / "run.json")
    (run / PARQUET).write_bytes(rows_to_parquet_bytes(rows.to_dict("records")))
    folder = render_report([run], out=tmp_path / "report")
    text = (folder / "report.md").read_text()
    assert "## Time over compute floor" in text and "380,000 to 420,000 GFLOP/s" in text and "n = 8192" in text
    for suffix in (".png", ".svg"):
        assert (folder / f"floor_ratio_vs_seq_len{suffix}").stat().st_size > 1000
    table = pivot_metric(load(run), "floor_ratio", fmt="{:.3g}")
    assert table.loc["full", 32768] == "OOM"
    ok = rows[rows["status"] == "ok"].iloc[0]
    expected = ok["time_ms_median"] / 1e3 / (ok["flops"] / (ok["matmul_gflops"] * 1e9))
    assert table.loc[ok["variant_label"], ok["seq_len"]] == f"{expected:.3g}"
    md_rows = _md_table_rows(text.split("## Time over compute floor")[1].split("\n## ")[0])
    assert [[series, *values] for series, values in table.iterrows()] == md_rows[1:]  # after the header
    # without the matmul rate, no such section
    assert "Time over compute floor" not in (rendered / "seq_length" / SEQ.name / "report.md").read_text()


def test_scaling_exponents_at_constant_tokens():
    fits = scaling_fits(load(SEQ), "seq_len").set_index("series")
    assert 0.8 < fits.loc["full", "time"] < 1.0  # linear per step = quadratic per sequence
    assert fits.loc["full", "cells"] == 5  # the OOM cell is not fitted
    assert fits.loc["lsh n_hashes=1", "time"] < 0.15  # about flat per step


def _seq_time_figure():
    rows = with_series(load(SEQ), "seq_len")
    palette = figures.series_palette(rows["series"])
    return figures.plot_metric(rows, "seq_len", figures.TIME, palette, title="t"), palette


def test_oom_cell_is_an_x_on_the_top_edge(rendered):
    fig, palette = _seq_time_figure()
    ax = fig.axes[0]
    failed = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("failed-")]
    assert [line.get_gid() for line in failed] == ["failed-oom-full-32768"]
    line = failed[0]
    assert line.get_marker() == "x" and list(line.get_xdata()) == [32768] and list(line.get_ydata()) == [1.0]
    top = ax.transAxes.transform((0.0, 1.0))[1]
    assert line.get_transform().transform((32768, 1.0))[1] == pytest.approx(top)  # on the top edge, whatever the data
    assert matplotlib.colors.to_rgb(line.get_color()) == pytest.approx(palette["full"])
    assert any(t.get_text() == "full: OOM" for t in ax.texts)
    # the full line itself stops at 16K
    full = [ln for ln in ax.get_lines() if ln.get_label() == "full"][0]
    assert list(full.get_xdata()) == [1024, 2048, 4096, 8192, 16384]
    svg = (rendered / "seq_length" / SEQ.name / "time_vs_seq_len.svg").read_text()
    assert 'id="failed-oom-full-32768"' in svg and "full: OOM" in svg


def test_paper_endpoints_are_drawn_and_tabled(rendered):
    folder = rendered / "seq_length" / SEQ.name
    svg = (folder / "time_vs_seq_len.svg").read_text()
    assert "paper, Fig. 5 (endpoints read off)" in svg and "LSH-8" in svg
    text = (folder / "report.md").read_text()
    rows = {r[0]: r for r in _md_table_rows(text)}
    assert rows["full attention"][1:4] == ["0.17", "3.5", "20.6"]
    assert rows["LSH-4"][1:3] == ["0.2", "0.23"]
    assert rows["full attention"][6] == "OOM"  # ours at 32K


def test_no_paper_lines_without_the_papers_setting(rendered):
    svg = (rendered / "layers_memory" / LAYERS.name / "time_vs_n_layers.svg").read_text()
    assert "paper" not in svg


def test_palette_is_derived_from_labels_and_stable():
    labels = ["lsh n_hashes=8", "full", "lsh n_hashes=1", "sdpa", "lsh n_hashes=2", "lsh n_hashes=4"]
    palette = figures.series_palette(labels)
    assert palette == figures.series_palette(list(reversed(labels)))
    assert len(set(palette.values())) == len(labels)
    assert figures.series_order(labels) == ["full", "sdpa", "lsh n_hashes=1", "lsh n_hashes=2", "lsh n_hashes=4", "lsh n_hashes=8"]

    def luminance(colour):
        return float(np.dot(colour, [0.299, 0.587, 0.114]))

    shades = [luminance(palette[f"lsh n_hashes={n}"]) for n in (1, 2, 4, 8)]
    assert shades == sorted(shades, reverse=True)  # sequential: more hashes, darker
    words = figures.series_palette(["lsh residual=standard", "lsh residual=reversible"])
    assert len(set(words.values())) == 2


def test_missing_or_corrupt_results_give_a_clear_error(tmp_path, capsys):
    run = tmp_path / "seq_length" / SEQ.name
    shutil.copytree(SEQ, run)
    (run / "run.json").unlink()
    with pytest.raises(ResultsError, match=r"run\.json: file not found"):
        render_report([run], out=tmp_path / "out")
    (run / "run.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"run\.json: unreadable JSON"):
        render_report([run], out=tmp_path / "out")
    shutil.copy(SEQ / "run.json", run / "run.json")
    (run / "results.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ResultsError, match="unreadable parquet"):
        render_report([run], out=tmp_path / "out")
    capsys.readouterr()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable parquet" in err and "Traceback" not in err
    assert cli.main(["compare", str(run), str(SEQ), "--out", str(tmp_path / "cmp")]) == 2
    assert cli.main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


def test_report_command_defaults_to_the_latest_run_of_each_suite(tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(DATA, root)
    older = root / "seq_length" / "20200101T000000Z-old"
    shutil.copytree(SEQ, older)
    assert cli.main(["report", "--root", str(root), "--out", str(tmp_path / "reports")]) == 0
    assert "report: " in capsys.readouterr().out
    assert (tmp_path / "reports" / "seq_length" / SEQ.name / "report.md").exists()
    assert (tmp_path / "reports" / "layers_memory" / LAYERS.name / "report.md").exists()
    assert not (tmp_path / "reports" / "seq_length" / older.name).exists()
    # one run and --out: the report goes straight into --out
    assert render_report([SEQ], out=tmp_path / "one") == tmp_path / "one"
    assert (tmp_path / "one" / "time_vs_seq_len.png").exists()


def test_compare_with_itself_is_one_and_within_noise(tmp_path):
    for run in (SEQ, LAYERS):  # 10+ repeats (Mann-Whitney) and 3 repeats (IQRs only)
        rows = open_run(run).rows
        merged = compare_runs(rows, rows)
        assert len(merged) == len(rows)
        ok = merged[merged["status_a"] == "ok"]
        assert np.allclose(ok["ratio"], 1.0) and np.allclose(ok["memory_ratio"], 1.0)
        assert ok["within_noise"].eq(True).all()
        folder = render_compare(run, run, out=tmp_path / run.parent.name)
        text = (folder / "report.md").read_text()
        assert (folder / "time_ratio.png").stat().st_size > 1000 and (folder / "time_ratio.svg").exists()
        assert "| NO |" not in text and "0 of them differ beyond noise" in text
    assert merged.loc[merged["status_a"] != "ok"].empty  # layers: all finished
    seq = compare_runs(open_run(SEQ).rows, open_run(SEQ).rows)
    assert seq.loc[seq["status_a"] == "oom", "within_noise"].isna().all()


def test_compare_flags_a_real_slowdown_and_matches_on_config_not_cell_key(tmp_path):
    rows = open_run(SEQ).rows
    slower = rows.copy()
    lsh = slower["variant"] == "lsh"
    slower.loc[lsh, "time_ms_median"] *= 1.5
    slower["time_ms_samples"] = [
        list(np.asarray(s) * (1.5 if is_lsh else 1.0)) if s is not None else None for s, is_lsh in zip(slower["time_ms_samples"], lsh)
    ]
    slower["cell_key"] = slower["cell_key"] + "x"  # another code version: other keys, same configs
    slower["code_version"] = "other"
    merged = compare_runs(rows, slower)
    assert len(merged) == len(rows)
    changed = merged[(merged["variant"] == "lsh")]
    assert np.allclose(changed["ratio"], 1.5) and changed["within_noise"].eq(False).all()
    same = merged[(merged["variant"] != "lsh") & (merged["status_a"] == "ok")]
    assert same["within_noise"].eq(True).all()
    other = rows.assign(dtype="float16")
    with pytest.raises(ResultsError, match="differ in: dtype"):
        compare_runs(rows, other)


def _quality_rows(row_type: bool) -> list[dict]:
    """Rows shaped like harness.quality's: curve rows (step, train/eval bpd) and eval rows (train x eval
    accuracy in percent); every row carries train_variant, eval rows also the last step."""
    base = {"kind": "quality", "task": "duplication", "device": "cpu", "seq_len": 128, "status": "ok", "message": ""}
    rows = []
    for label, n in (("LSH-1", 1), ("LSH-4", 4)):
        common = {**base, "variant": "lsh", "variant_label": label, "train_variant": label, "variant_params": json.dumps({"n_hashes": n})}
        for step in (0, 100, 200, 300):
            rows.append(
                {
                    **common,
                    "row_type": "curve",
                    "cell_key": f"c{n}{step}",
                    "step": step,
                    "train_bpd": 8 - step / 100 - n / 10,
                    "eval_bpd": 8.2 - step / 100 - n / 10,
                    "eval_accuracy": step / 4,
                }
            )
        for evaluate, accuracy in (("full", 40.0 + n), ("LSH-1", 50.0 + n), ("LSH-4", 60.0 + n)):
            rows.append(
                {
                    **common,
                    "row_type": "eval",
                    "cell_key": f"e{n}{evaluate}",
                    "step": 300,
                    "eval_variant": evaluate,
                    "eval_bpd": 1.5,
                    "accuracy": accuracy,
                }
            )
    rows.append(
        {
            **base,
            "variant": "lsh",
            "variant_label": "LSH-8",
            "train_variant": "LSH-8",
            "row_type": "error",
            "cell_key": "err",
            "status": "error",
            "message": "RuntimeError: boom",
        }
    )
    if not row_type:
        rows = [{k: v for k, v in r.items() if k != "row_type"} for r in rows if r.get("row_type") != "error"]
    return rows


@pytest.mark.parametrize("row_type", [True, False], ids=["row_type", "inferred"])
def test_learning_curves_and_train_by_eval_grid(tmp_path, row_type):
    """A small synthetic quality run (a later issue's rows): bits-per-dim curves and the accuracy grid."""
    run = tmp_path / "results" / "duplication" / "20260101T000000Z-cpu"
    run.mkdir(parents=True)
    pd.DataFrame(_quality_rows(row_type)).to_parquet(run / "results.parquet", index=False)
    (run / "run.json").write_text(json.dumps({"suite": "duplication", "command": "python -m harness run x.yaml"}))
    folder = render_report([run], out=tmp_path / "report")
    for stem in ("bpd_curves", "train_eval_accuracy"):
        assert (folder / f"{stem}.png").stat().st_size > 1000 and (folder / f"{stem}.svg").exists()
    assert not any((folder / f"{s}.png").exists() for s in SEQ_FIGURES)  # no benchmark rows, no speed figures
    text = (folder / "report.md").read_text()
    grid = _md_table_rows(text.split("## Train-by-eval accuracy (%)")[1].split("Table 2")[0])
    assert grid == [
        ["trained with \\ evaluated with", "full", "LSH-1", "LSH-4"],
        ["LSH-1", "41.0", "51.0", "61.0"],
        ["LSH-4", "44.0", "54.0", "64.0"],
    ]
    last = _md_table_rows(text.split("## Learning curves")[1].split("##")[0])
    assert last[1][:4] == ["LSH-1", "300", "4.9", "5.1"]  # the curve's last step, not the eval rows
    assert "Table 2" in text and "python -m harness run x.yaml" in text and "training on duplication" in text
    assert ("RuntimeError: boom" in text) == row_type


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_index_html_opens_in_headless_chromium_with_every_image(rendered, tmp_path):
    page = rendered / "seq_length" / SEQ.name / "index.html"
    copy = tmp_path / "page" / "index.html"
    shutil.copytree(page.parent, copy.parent)
    probe = (
        '<img src="does-not-exist.png" alt="control"><script>window.addEventListener(\'load\', function () {'
        "var all = [].slice.call(document.images);"
        "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;"
        "document.body.setAttribute('data-images', ok + '/' + all.length); });</script></body>"
    )
    copy.write_text(copy.read_text().replace("</body>", probe))
    result = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-images="(\d+)/(\d+)"', result.stdout)
    assert match, result.stderr[-2000:]
    loaded, total = int(match.group(1)), int(match.group(2))
    assert total == len(SEQ_FIGURES) + 1  # the figures plus the broken control image
    assert loaded == len(SEQ_FIGURES)  # every figure decoded; the control did not (the probe works)
