"""harness.report.roofline: the points of the roofline against hand-computed intensities and rates,
the forward / backward table, and the figure with both roofs drawn."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.report.document import Figure, Table
from harness.report.palette import series_palette
from harness.report.roofline import phase_table, roofline_points, roofline_sections, run_roofs


def rows() -> pd.DataFrame:
    base = {"workload": "attention", "mode": "forward_backward", "device": "cpu", "dtype": "float32", "batch": 1, "status": "ok"}
    out = []
    for variant, seq_len, forward_ms, backward_ms in [("full", 256, 2.0, 4.0), ("full", 512, 8.0, 16.0), ("lsh", 512, 5.0, 5.0)]:
        out.append(
            {
                **base,
                "variant": variant,
                "variant_label": variant,
                "seq_len": seq_len,
                "contended": variant == "lsh",
                "flops": 3e9,
                "forward_flops": 1e9,
                "backward_flops": 2e9,
                "step_bytes": 6e8,
                "forward_bytes": 2e8,
                "backward_bytes": 4e8,
                "time_ms_median": forward_ms + backward_ms + 0.1,
                "forward_ms_median": forward_ms,
                "backward_ms_median": backward_ms,
                "matmul_gflops": {256: 90.0, 512: 100.0}[seq_len],
                "membw_gbytes_per_s": 10.0,
                "roof_fraction": 0.5,
                "roof_bound": "memory",
            }
        )
    out.append({**base, "variant": "full", "variant_label": "full", "seq_len": 1024, "status": "oom", "contended": False})
    return pd.DataFrame(out)


def test_points_are_each_phase_at_its_intensity_and_rate() -> None:
    frame = rows()
    assert run_roofs(frame) == (100.0, 10.0)  # medians over the finished cells
    points = roofline_points(frame)
    assert len(points) == 6 and set(points["phase"]) == {"forward", "backward"}
    forward = points[(points["series"] == "full") & (points["seq_len"] == 256) & (points["phase"] == "forward")].iloc[0]
    assert forward["intensity"] == 5.0 and forward["gflops_per_s"] == pytest.approx(1e9 / 2e-3 / 1e9)  # 1 GFLOP in 2 ms
    # 5 FLOP/byte x 10 GB/s = 50 GFLOP/s under the 100 GFLOP/s roof: memory bound (synthetic rates may exceed it)
    assert forward["bound"] == "memory" and forward["roof_fraction"] == pytest.approx(500 / 50)
    assert points[points["series"] == "lsh"]["contended"].all()
    old = frame.drop(columns=["forward_ms_median", "backward_ms_median"])  # a run stored before the split
    whole = roofline_points(old)
    assert set(whole["phase"]) == {"whole step"} and whole["intensity"].iloc[0] == 5.0


def test_phase_table_shows_the_split_and_the_total() -> None:
    table = phase_table(rows(), "seq_len")
    assert table.loc["full", 256] == "2 + 4 = 6 (6.1)" and table.loc["full", 1024] == "OOM"


def test_sections_draw_the_roofline_with_both_roofs(tmp_path) -> None:
    frame = rows()
    blocks = roofline_sections(frame, tmp_path, series_palette(["full", "lsh"]))
    texts = " ".join(getattr(b, "text", "") for b in blocks)
    assert "Forward and backward" in texts and "Roofline" in texts
    assert "compute roof 100.0 GFLOP/s" in texts and "memory roof 10.0 GB/s" in texts and "ridge at 10 FLOP/byte" in texts
    assert any(isinstance(b, Figure) and b.stem == "roofline" for b in blocks) and sum(isinstance(b, Table) for b in blocks) == 3
    svg = (tmp_path / "roofline.svg").read_text()
    assert "compute roof 100 GFLOP/s" in svg and "memory roof 10.0 GB/s" in svg and (tmp_path / "roofline.png").stat().st_size > 0
    unmeasured = roofline_sections(frame.drop(columns=["matmul_gflops", "membw_gbytes_per_s"]), tmp_path / "u", {})
    assert not any(isinstance(b, Figure) for b in unmeasured) and "were not measured" in " ".join(
        getattr(b, "text", "") for b in unmeasured
    )
