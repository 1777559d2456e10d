"""harness.commands.run.print_summary: what `harness run` prints when it ends, from the rows alone."""

from __future__ import annotations

import pandas as pd

from harness.commands.run import print_summary


def _cell(variant: str, seq_len: int, status: str = "ok", **extra) -> dict:
    row = {"variant": variant, "variant_label": variant, "seq_len": seq_len, "batch": 1, "status": status}
    row |= {"time_ms_median": 2.0 * seq_len / 512, "peak_mem_mib": seq_len / 8, "message": "", "contended": False}
    return row | extra


def test_the_summary_tables_counts_contention_and_a_relative_results_line(tmp_path, capsys, monkeypatch):
    rows = pd.DataFrame(
        [
            _cell("full", 512),
            _cell("full", 1024, "oom", message="OutOfMemoryError: 4 GiB\nmore"),
            _cell("lsh", 512, contended=True, contention="CPU share 0.50 < 0.85", contention_retries_used=2),
            _cell("lsh", 1024),
            _cell("lsh", 1024, row_type="round", round=1, time_ms_median=99.0),  # a round: left out
        ]
    )
    monkeypatch.chdir(tmp_path)
    print_summary("benchmark", rows, "tiny", (tmp_path / "results" / "tiny" / "run1").absolute())
    out = capsys.readouterr().out
    times = (
        rows.iloc[:4]
        .assign(shown=["2", "OOM", "2*", "4"])
        .pivot_table(index="variant_label", columns="seq_len", values="shown", aggfunc="last")
    )
    times.index.name, times.columns.name = "series", "seq_len"
    assert f"\nmedian time per call (ms), tiny:\n{times.to_string()}\n(*: contended" in out
    assert "not ok:\n  full L=1024 B=1: oom: OutOfMemoryError: 4 GiB\n\n4 cells: 3 ok, 1 oom\n" in out
    assert "1 of 4 cells contended" in out and "  lsh L=512 B=1: CPU share 0.50 < 0.85 (re-measured 2x)" in out
    assert out.endswith("results: results/tiny/run1\n")
    assert str(tmp_path) not in out
