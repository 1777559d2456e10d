"""harness.report / harness.figures: reports and comparisons rendered from stored results.

The runs are synthetic, built per module by tests/harness/report_fixtures.py the way `harness run`
stores them (run.json, rows appended through the journal, folded into results.parquet): seq_length
(one attention layer at 32,768 tokens/step; full attention quadratic per sequence and out of memory
at 32K, LSH linear) and layers_memory (Reformer LM training memory against depth, standard against
reversible residuals). Their metrics follow the fixtures' formulas, and the tests check the
report's tables, fits and figures against those formulas.
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

from harness import cli, figures, paper
from harness.report import (
    compare_runs,
    lra_comparison,
    memory_breakdown_table,
    open_run,
    render_compare,
    render_report,
    scaling_fits,
    summary_tables,
    sweep_axes,
    with_series,
)
from harness.store.files import ResultsError
from harness.store.reader import load
from harness.tables import pivot_metric
from tests.harness import report_fixtures as fx

SEQ_FIGURES = ("time_vs_seq_len", "memory_vs_seq_len", "tokens_per_s_vs_seq_len")
LAYERS_FIGURES = ("memory_vs_n_layers", "time_vs_n_layers")


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    """A results root holding one seq_length and one layers_memory run (see report_fixtures)."""
    root = tmp_path_factory.mktemp("results")
    fx.seq_length_run(root)
    fx.layers_memory_run(root)
    return root


@pytest.fixture(scope="module")
def seq(results_root) -> Path:
    return results_root / fx.SEQ_SUITE / fx.SEQ_RUN_ID


@pytest.fixture(scope="module")
def layers(results_root) -> Path:
    return results_root / fx.LAYERS_SUITE / fx.LAYERS_RUN_ID


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, seq, layers) -> Path:
    """Both runs rendered once into a temporary folder; returns that folder."""
    out = tmp_path_factory.mktemp("reports")
    index = render_report([seq, layers], out=out)
    assert index == out / "index.html"
    return out


def _md_table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in markdown.splitlines() if line.startswith("| ")]


def _seq_expected(formula, fmt: str) -> pd.DataFrame:
    """The seq_length table a report should show: `formula(series, L)` formatted, OOM where it runs out."""
    return pd.DataFrame(
        {
            seq_len: [("OOM" if fx.seq_oom(s, seq_len) else fmt.format(formula(s, seq_len))) for s in fx.SEQ_VARIANTS]
            for seq_len in fx.SEQ_LENS
        },
        index=list(fx.SEQ_VARIANTS),
    )


def test_report_writes_every_figure_and_document(rendered, seq, layers):
    for run, stems, absent in ((seq, SEQ_FIGURES, LAYERS_FIGURES), (layers, LAYERS_FIGURES, SEQ_FIGURES)):
        folder = rendered / run.parent.name / run.name
        for stem in stems:
            for suffix in (".png", ".svg"):
                assert (folder / f"{stem}{suffix}").stat().st_size > 1000, f"{stem}{suffix}"
            assert f"({stem}.png)" in (folder / "report.md").read_text()
        for stem in absent:  # figures follow the columns that vary, not the suite
            assert not (folder / f"{stem}.png").exists()
        assert (folder / "index.html").stat().st_size > 10_000
    index = (rendered / "index.html").read_text()
    assert f"seq_length/{seq.name}/index.html" in index and f"layers_memory/{layers.name}/index.html" in index


def test_report_states_environment_command_and_units(rendered, seq):
    text = (rendered / "seq_length" / seq.name / "report.md").read_text()
    assert json.loads((seq / "run.json").read_text())["command"] == fx.SEQ_COMMAND
    assert fx.SEQ_COMMAND in text
    for fact in (fx.DEVICE_NAME, fx.GPU_DRIVER, fx.TORCH_VERSION, fx.CODE_VERSION, f"threads (torch) | {fx.THREADS}"):
        assert fact in text
    assert "median time per step (ms)" in text and "peak memory (MiB)" in text
    assert "32,768" in text  # constant tokens per step stated with the exponents
    n_cells = len(fx.SEQ_VARIANTS) * len(fx.SEQ_LENS)
    assert f"{n_cells} rows ({n_cells - 1} ok, 1 oom)" in text
    assert f"{fx.SEQ_REPEATS} timed repeats per cell" in text and "0 cell(s) noisy" in text


def test_summary_tables_follow_the_formulas(rendered, seq):
    tables = summary_tables(load(seq))
    time = tables["median time per step (ms), by seq_len"]
    memory = tables["peak memory (MiB), by seq_len"]
    expected_time = _seq_expected(fx.seq_time_ms, "{:.4g}")
    expected_memory = _seq_expected(fx.seq_peak_mib, "{:.1f}")
    assert time.to_dict("index") == expected_time.to_dict("index")
    assert memory.to_dict("index") == expected_memory.to_dict("index")
    assert list(time.index) == list(fx.SEQ_VARIANTS) and list(time.columns) == list(fx.SEQ_LENS)
    assert time.loc["full", 32768] == "OOM" and [fx.seq_oom("full", n) for n in fx.SEQ_LENS] == [False] * 5 + [True]
    assert time.loc["full", 1024] == f"{fx.FULL_MS * 1024**2 * 32:.4g}" == "6.711"  # 32 sequences of 1K
    assert memory.loc["lsh n_hashes=4", 2048] == f"{fx.BASE_MIB + 16 * fx.LSH_MIB * 4 * 2048:.1f}" == "2304.0"
    # and report.md shows exactly these tables
    md_rows = _md_table_rows((rendered / "seq_length" / seq.name / "report.md").read_text())
    for table in (expected_time, expected_memory):
        for series, values in table.iterrows():
            assert [series, *values] in md_rows


def test_layers_tables_and_fits(rendered, layers):
    rows = load(layers)
    assert sweep_axes(rows) == ["n_layers"]
    memory = summary_tables(rows)["peak memory (MiB), by n_layers"]
    for residual in fx.RESIDUALS:
        shown = memory.loc[f"lsh residual={residual}"]
        assert list(shown) == [f"{fx.layers_peak_mib(residual, n):.1f}" for n in fx.N_LAYERS]
    assert memory.loc["lsh residual=standard", 12] == f"{fx.STANDARD_BASE_MIB + 12 * fx.STANDARD_MIB_PER_LAYER:.1f}" == "7040.0"
    fits = scaling_fits(rows, "n_layers").set_index("series")
    # standard residuals keep every layer's activations; reversible ones do not
    assert fits.loc["lsh residual=standard", "memory"] == pytest.approx(fx.STANDARD_MIB_PER_LAYER, abs=1e-3)
    assert fits.loc["lsh residual=reversible", "memory"] == pytest.approx(fx.REVERSIBLE_MIB_PER_LAYER, abs=1e-3)
    assert fits.loc["lsh residual=standard", "time"] == pytest.approx(fx.STANDARD_MS_PER_LAYER, abs=1e-3)
    assert fits.loc["lsh residual=reversible", "time"] == pytest.approx(fx.REVERSIBLE_MS_PER_LAYER, abs=1e-3)
    assert fits["cells"].tolist() == [len(fx.N_LAYERS)] * 2 and fits["range"].tolist() == ["1..12"] * 2
    # the report's fit table: slopes per layer
    text = (rendered / "layers_memory" / layers.name / "report.md").read_text()
    md = {r[0]: r for r in _md_table_rows(text.split("### Scaling with n_layers")[1].split("\n## ")[0])}
    assert md["series"][3:] == ["ms per layer", "MiB per layer"]
    assert md["lsh residual=standard"][3:] == ["6.5", "576"] and md["lsh residual=reversible"][3:] == ["8.5", "0.25"]


def test_memory_breakdown_figure_table_and_words(rendered, layers):
    folder = rendered / "layers_memory" / layers.name
    assert (folder / "memory_breakdown_vs_n_layers.png").stat().st_size > 10_000
    table = memory_breakdown_table(load(layers), "n_layers").set_index(["series", "n_layers"])
    for residual in fx.RESIDUALS:
        for n in fx.N_LAYERS:
            parts = fx.layers_breakdown_mib(residual, n)
            shown = table.loc[(f"lsh residual={residual}", n)]
            assert shown["activation_mem_mib"] == round(fx.layers_peak_mib(residual, n), 1)
            assert shown["total_mib"] == pytest.approx(sum(parts.values()), abs=0.1)
    text = (folder / "report.md").read_text()
    section = text.split("## Memory breakdown (MiB)")[1].split("\n## ")[0]
    assert "reversible layers store activations once" in section
    low, high = fx.layers_peak_mib("reversible", 1), fx.layers_peak_mib("reversible", 12)
    assert f"lsh residual=reversible: activations {low:.1f} -> {high:.1f} MiB ({high / low:.2f}x)" in section
    low, high = fx.layers_peak_mib("standard", 1), fx.layers_peak_mib("standard", 12)
    assert f"lsh residual=standard: activations {low:.1f} -> {high:.1f} MiB ({high / low:.2f}x)" in section


def test_time_over_compute_floor_table_and_figure(rendered, seq, tmp_path):
    # The seq_length run as if its suite had `matmul_rate: true`: a matmul rate per cell, and the
    # floor columns the runner derives from it.
    run = fx.seq_length_run(tmp_path / "results", matmul_rate=True)
    folder = render_report([run], out=tmp_path / "report")
    text = (folder / "report.md").read_text()
    assert "## Time over compute floor" in text and "380,000 to 420,000 GFLOP/s" in text and "n = 8192" in text
    for suffix in (".png", ".svg"):
        assert (folder / f"floor_ratio_vs_seq_len{suffix}").stat().st_size > 1000
    table = pivot_metric(load(run), "floor_ratio", fmt="{:.3g}")
    rates = iter(np.linspace(*fx.MATMUL_GFLOPS, len(fx.SEQ_VARIANTS) * len(fx.SEQ_LENS)))
    for series in fx.SEQ_VARIANTS:  # cells in suite order, one rate each
        for seq_len in fx.SEQ_LENS:
            rate = next(rates)
            if fx.seq_oom(series, seq_len):
                assert table.loc[series, seq_len] == "OOM"
                continue
            floor_s = fx.seq_flops(series, seq_len) / (rate * 1e9)
            assert table.loc[series, seq_len] == f"{fx.seq_time_ms(series, seq_len) / 1e3 / floor_s:.3g}"
    assert table.loc["full", 32768] == "OOM"
    md_rows = _md_table_rows(text.split("## Time over compute floor")[1].split("\n## ")[0])
    assert [[series, *values] for series, values in table.iterrows()] == md_rows[1:]  # after the header
    # without the matmul rate, no such section
    assert "Time over compute floor" not in (rendered / "seq_length" / seq.name / "report.md").read_text()


def test_scaling_exponents_at_constant_tokens(rendered, seq):
    fits = scaling_fits(load(seq), "seq_len").set_index("series")
    # per step at constant tokens: full and sdpa ~ L^1 (L^2 per sequence), lsh flat (L per sequence)
    for series in ("full", "sdpa"):
        assert fits.loc[series, "time"] == pytest.approx(1.0, abs=1e-3)
    for n in (1, 2, 4, 8):
        assert fits.loc[f"lsh n_hashes={n}", "time"] == pytest.approx(0.0, abs=1e-3)
        assert fits.loc[f"lsh n_hashes={n}", "memory"] == pytest.approx(0.0, abs=1e-3)
    assert fits.loc["full", "cells"] == 5 and fits.loc["full", "range"] == "1024..16384"  # the OOM cell is not fitted
    assert fits.loc["sdpa", "cells"] == 6
    # full's memory (BASE_MIB + 3 MiB * L at these tokens): the least-squares slope of the formula's logs
    lengths = np.array(fx.SEQ_LENS[:5], dtype=float)
    reference = np.polyfit(np.log(lengths), np.log([fx.seq_peak_mib("full", int(n)) for n in lengths]), 1)[0]
    assert fits.loc["full", "memory"] == pytest.approx(reference, abs=1e-3)
    text = (rendered / "seq_length" / seq.name / "report.md").read_text()
    md = {r[0]: r for r in _md_table_rows(text.split("### Scaling with seq_len")[1].split("\n## ")[0])}
    assert md["full"][3] == "1" and md["full"][5] == "2"  # k time, per-sequence exponent k + 1
    assert md["lsh n_hashes=8"][3] == "0" and md["lsh n_hashes=8"][5] == "1"


def _seq_time_figure(seq: Path):
    rows = with_series(load(seq), "seq_len")
    palette = figures.series_palette(rows["series"])
    return figures.plot_metric(rows, "seq_len", figures.TIME, palette, title="t"), palette


def test_oom_cell_is_an_x_on_the_top_edge(rendered, seq):
    fig, palette = _seq_time_figure(seq)
    ax = fig.axes[0]
    failed = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("failed-")]
    assert [line.get_gid() for line in failed] == ["failed-oom-full-32768"]
    line = failed[0]
    assert line.get_marker() == "x" and list(line.get_xdata()) == [32768] and list(line.get_ydata()) == [1.0]
    top = ax.transAxes.transform((0.0, 1.0))[1]
    assert line.get_transform().transform((32768, 1.0))[1] == pytest.approx(top)  # on the top edge, whatever the data
    assert matplotlib.colors.to_rgb(line.get_color()) == pytest.approx(palette["full"])
    assert any(t.get_text() == "full: OOM" for t in ax.texts)
    # the full line itself stops at 16K, at the formula's times (seconds)
    full = [ln for ln in ax.get_lines() if ln.get_label() == "full"][0]
    assert list(full.get_xdata()) == [1024, 2048, 4096, 8192, 16384]
    assert list(full.get_ydata()) == pytest.approx([fx.seq_time_ms("full", n) / 1e3 for n in fx.SEQ_LENS[:5]])
    svg = (rendered / "seq_length" / seq.name / "time_vs_seq_len.svg").read_text()
    assert 'id="failed-oom-full-32768"' in svg and "full: OOM" in svg


def test_paper_endpoints_are_drawn_and_tabled(rendered, seq):
    folder = rendered / "seq_length" / seq.name
    svg = (folder / "time_vs_seq_len.svg").read_text()
    assert "paper, Fig. 5 (endpoints read off)" in svg and "LSH-8" in svg
    text = (folder / "report.md").read_text()
    rows = {r[0]: r for r in _md_table_rows(text)}
    assert rows["full attention"][1:4] == ["0.17", "3.5", "20.6"]
    assert rows["LSH-4"][1:3] == ["0.2", "0.23"]
    # ours, in seconds per step: the formulas at 1K and 32K, and their ratio
    assert rows["full attention"][4:6] == ["full", f"{fx.seq_time_ms('full', 1024) / 1000:.4g}"]
    assert rows["full attention"][6:8] == ["OOM", "-"]  # ours at 32K
    lsh4 = fx.seq_time_ms("lsh n_hashes=4", 1024) / 1000
    assert rows["LSH-4"][4:8] == ["lsh n_hashes=4", f"{lsh4:.4g}", f"{lsh4:.4g}", "1"]  # flat per step


def test_no_paper_lines_without_the_papers_setting(rendered, layers):
    svg = (rendered / "layers_memory" / layers.name / "time_vs_n_layers.svg").read_text()
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


def test_missing_or_corrupt_results_give_a_clear_error(seq, tmp_path, capsys):
    run = tmp_path / "seq_length" / seq.name
    shutil.copytree(seq, run)
    (run / "run.json").unlink()
    with pytest.raises(ResultsError, match=r"run\.json: file not found"):
        render_report([run], out=tmp_path / "out")
    (run / "run.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"run\.json: unreadable JSON"):
        render_report([run], out=tmp_path / "out")
    shutil.copy(seq / "run.json", run / "run.json")
    (run / "results.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ResultsError, match="unreadable parquet"):
        render_report([run], out=tmp_path / "out")
    capsys.readouterr()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable parquet" in err and "Traceback" not in err
    assert cli.main(["compare", str(run), str(seq), "--out", str(tmp_path / "cmp")]) == 2
    assert cli.main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


def test_report_command_defaults_to_the_latest_run_of_each_suite(results_root, seq, layers, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(results_root, root)
    older = root / "seq_length" / "20200101T000000Z-old"
    shutil.copytree(seq, older)
    assert cli.main(["report", "--root", str(root), "--out", str(tmp_path / "reports")]) == 0
    assert "report: " in capsys.readouterr().out
    assert (tmp_path / "reports" / "seq_length" / seq.name / "report.md").exists()
    assert (tmp_path / "reports" / "layers_memory" / layers.name / "report.md").exists()
    assert not (tmp_path / "reports" / "seq_length" / older.name).exists()
    # one run and --out: the report goes straight into --out
    assert render_report([seq], out=tmp_path / "one") == tmp_path / "one"
    assert (tmp_path / "one" / "time_vs_seq_len.png").exists()


def test_compare_with_itself_is_one_and_within_noise(seq, layers, tmp_path):
    for run in (seq, layers):  # 11 repeats (Mann-Whitney) and 3 repeats (IQRs only)
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
    same = compare_runs(open_run(seq).rows, open_run(seq).rows)
    assert same.loc[same["status_a"] == "oom", "within_noise"].isna().all()
    assert (same["status_a"] == "oom").sum() == 1


def test_compare_flags_a_real_slowdown_and_matches_on_config_not_cell_key(seq):
    rows = open_run(seq).rows
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
    assert "**Smaller than the paper's setting** (seq_len 128 (paper 1,024))" in text  # the one scale column here
    assert ("RuntimeError: boom" in text) == row_type


def test_table2_scale_note_flags_a_smaller_run():
    rows = pd.DataFrame({"seq_len": [128], "d_model": [128], "d_ff": [128], "train_steps": [400]})
    note = paper.table2_scale_note(rows)
    assert note.startswith("**Smaller than the paper's setting**") and "seq_len 128 (paper 1,024)" in note
    assert "train_steps 400 (paper 150,000)" in note
    at_scale = paper.table2_scale_note(pd.DataFrame({"seq_len": [1024], "d_model": [256], "d_ff": [256], "train_steps": [150000]}))
    assert at_scale.startswith("This run is at the paper's scale")


def test_lra_comparison_puts_lras_ratios_beside_the_runs():
    """Hand-made model training rows (full, local, two LSH series at 1K and 4K): speed = full's time
    over the series', memory = peak plus state over full's; LRA's ratios from its Table 2 steps/s
    and GB (local at 4K: 7.4 / 1.4 = 5.3x, 1.37 / 9.48 = 0.14x)."""
    base = {"workload": "model", "mode": "train_step", "status": "ok", "batch": 2, "n_layers": 2, "device": "cpu"}
    base |= {"param_mem_mib": 10.0, "grad_mem_mib": 10.0, "optim_mem_mib": 20.0}
    cells = [  # (variant, label, seq_len, time ms, peak MiB above the state)
        ("full", "full", 1024, 400.0, 160.0),
        ("full", "full", 4096, 6000.0, 1960.0),
        ("local", "local", 1024, 300.0, 110.0),
        ("local", "local", 4096, 1000.0, 460.0),
        ("lsh", "LSH-2", 4096, 750.0, 360.0),
        ("lsh", "LSH-4", 4096, 1500.0, 560.0),
    ]
    rows = pd.DataFrame(
        [
            {**base, "variant": v, "variant_label": label, "seq_len": n, "time_ms_median": t, "peak_mem_mib": m}
            for v, label, n, t, m in cells
        ]
    )
    speed, memory, words = lra_comparison(rows)
    assert list(speed.columns) == ["series here", "1K (LRA / here)", "4K (LRA / here)"]
    assert speed.loc["Local attention", "4K (LRA / here)"] == "5.3x / 6.0x"  # 6000 / 1000
    assert speed.loc["Local attention", "1K (LRA / here)"] == "1.1x / 1.3x"  # 9.2 / 8.1; 400 / 300
    assert memory.loc["Local attention", "4K (LRA / here)"] == "0.14x / 0.25x"  # (460 + 40) / (1960 + 40)
    reformer = speed.loc["Reformer"]
    assert list(reformer["series here"]) == ["LSH-2", "LSH-4"]
    assert list(reformer["4K (LRA / here)"]) == ["0.8x / 8.0x", "0.8x / 4.0x"]
    assert list(reformer["1K (LRA / here)"]) == ["0.5x / -", "0.5x / -"]  # no LSH cell at 1K
    assert "batch 2, 2 layers" in words and "local 6.0x the Transformer's steps/s and 0.25x its memory" in words
    assert lra_comparison(rows.assign(workload="attention")) is None  # one layer is not LRA's protocol
    assert lra_comparison(rows[rows["variant"] != "full"]) is None  # nothing to be relative to


QUALITY_SUITE_WITH_TARGETS = """
name: duplication
kind: quality
checks:
  targets:
    - {name: "LSH-4 no worse than LSH-1", numerator: "train_variant == 'LSH-4' and eval_variant == 'LSH-4'",
       denominator: "train_variant == 'LSH-1' and eval_variant == 'LSH-1'", match_on: [seq_len], metric: bpd, max: 1.01}
    - {name: "LSH-4 below 0.7 of LSH-1", numerator: "train_variant == 'LSH-4' and eval_variant == 'LSH-4'",
       denominator: "train_variant == 'LSH-1' and eval_variant == 'LSH-1'", match_on: [seq_len], metric: bpd, max: 0.7}
"""


def test_report_evaluates_the_suites_targets(tmp_path):
    """The report's Targets section: each rule of the suite's `checks: targets:` with its value (here
    eval bpd 1.5 / 2.0 = 0.75) and MET / MISSED against the bound, as `harness check --targets` decides."""
    run = tmp_path / "results" / "duplication" / "20260101T000000Z-cpu"
    run.mkdir(parents=True)
    rows = pd.DataFrame(_quality_rows(row_type=True))
    rows.loc[(rows["row_type"] == "eval") & (rows["train_variant"] == "LSH-1") & (rows["eval_variant"] == "LSH-1"), "eval_bpd"] = 2.0
    rows["eval_variant_name"] = rows["eval_variant"].map({"full": "full", "LSH-1": "lsh", "LSH-4": "lsh"})
    rows["eval_variant_params"] = rows["eval_variant"].map({"full": "{}", "LSH-1": '{"n_hashes": 1}', "LSH-4": '{"n_hashes": 4}'})
    rows.to_parquet(run / "results.parquet", index=False)
    info = {"suite": "duplication", "suite_path": "suites/x.yaml", "suite_text": QUALITY_SUITE_WITH_TARGETS, "command": "x"}
    (run / "run.json").write_text(json.dumps(info))
    text = (render_report([run], out=tmp_path / "report") / "report.md").read_text()
    section = text.split("## Targets")[1].split("\n## ")[0]
    assert "1 of 2 met, 1 missed" in section
    table = {r[0]: r for r in _md_table_rows(section)[1:]}
    assert table["LSH-4 no worse than LSH-1"][2] == "0.750" and table["LSH-4 no worse than LSH-1"][-1] == "MET"
    assert table["LSH-4 below 0.7 of LSH-1"][-1] == "MISSED"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_index_html_opens_in_headless_chromium_with_every_image(rendered, seq, tmp_path):
    page = rendered / "seq_length" / seq.name / "index.html"
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


# --------------------------------------------------------------------------- contention and rounds


@pytest.fixture(scope="module")
def disturbed(results_root, seq) -> Path:
    """The seq_length run again, as if measured in 3 rounds on a busy machine: two lsh cells stayed
    contended (CPU share 0.50), every ok cell has a round drift of 2% (4% for full at 1K)."""
    from harness.store.reader import load_run_info
    from harness.store.writer import RunStore

    store = RunStore(results_root, fx.SEQ_SUITE, "20260302T120000Z-disturbed")
    store.write_run_info(load_run_info(seq))
    rows = load(seq)
    for record in rows.to_dict("records"):
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and np.isnan(v))}
        busy = record["variant_label"] == "lsh n_hashes=1" and record["seq_len"] in (1024, 2048)
        record.update(contended=busy, contention="CPU share 0.50 < 0.85; other processes 1.0 cores busy" if busy else "")
        record.update(cpu_share=0.5 if busy else 0.98, other_cpu_cores=1.0 if busy else 0.02, load_avg_1m=2.0 if busy else 0.3)
        if record["status"] == "ok":
            record.update(rounds=3, round_drift=0.04 if (record["variant"], record["seq_len"]) == ("full", 1024) else 0.02)
        store.append(record)
    store.fold()
    return store.path


def test_contended_cells_are_marked_and_drift_and_machine_load_reported(disturbed, tmp_path):
    folder = render_report([disturbed], out=tmp_path / "report")
    text = (folder / "report.md").read_text()
    time_table = text.split("### median time per step (ms)")[1].split("###")[0]
    lsh_1 = next(line for line in time_table.splitlines() if line.startswith("| lsh n_hashes=1 |"))
    assert lsh_1.count("*") == 2 and time_table.count("*") == 2  # the two contended cells, nothing else
    assert "### Contended cells" in text and "2 of 36 cells stayed contended" in text
    assert "CPU share 0.50 < 0.85; other processes 1.0 cores busy" in text
    assert "### Round-to-round drift" in text and "Median drift 2.0%, largest 4.0%" in text and "| 4.0% |" in text
    assert "| machine load during the run | CPU share median 0.98 (0.50-0.98); other processes' CPU 0.02 cores median (max 1.00); " in text
    assert "load average 0.3-2.0; 2 of 36 cells contended |" in text
    assert "2 of 36 cell(s) contended; 3 interleaved rounds per cell" in text
    svg = (folder / "time_vs_seq_len.svg").read_text()
    assert len(re.findall(r'id="contended-lsh-n_hashes-1-(1024|2048)"', svg)) == 2
    assert "contended (timing disturbed by other load)" in svg
    assert "contended-" not in (folder / "memory_vs_seq_len.svg").read_text()  # memory is not a timing


def test_compare_treats_a_contended_cell_as_inconclusive(seq, disturbed, tmp_path):
    lines: list[str] = []
    folder = render_compare(seq, disturbed, out=tmp_path / "compare", echo=lines.append)
    merged = compare_runs(open_run(seq).rows, open_run(disturbed).rows)
    vague = merged[merged["inconclusive"]]
    assert sorted(vague["seq_len"]) == [1024, 2048] and vague["within_noise"].isna().all()
    assert merged.loc[~merged["inconclusive"] & (merged["status"] == "ok"), "within_noise"].eq(True).all()
    assert "0 of them differ beyond noise, 2 inconclusive: contended in A or B" in lines[0]
    assert lines[1].startswith("inconclusive: lsh n_hashes=1 seq_len=1024: B CPU share 0.50")
    text = (folder / "report.md").read_text()
    assert text.count("inconclusive (contended)") == 2 and "## Inconclusive cells (contended)" in text
    assert 'id="contended-lsh-n_hashes-1-1024"' in (folder / "time_ratio.svg").read_text()
