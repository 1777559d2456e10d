"""harness.analysis.paper: the published numbers and a run put beside them."""

from __future__ import annotations

import pandas as pd

from harness.analysis import paper
from harness.analysis.paper import lra_comparison


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
