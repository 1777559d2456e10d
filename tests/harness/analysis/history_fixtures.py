"""Runs of one suite at two code versions, as a regression history looks: the synthetic seq_length run
of report_fixtures (11 repeats per cell) stored four times, v1 twice then v2 twice, each run's every
cell slower or faster by its own between-run drift (log-normal, sd DRIFT_SD, seeded per run), and in
v2 one configuration (PLANTED: lsh n_hashes=1 at L = 4096) PLANTED_RATIO times slower."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.store.reader import load, load_run_info
from harness.store.writer import RunStore
from tests.harness.report import report_fixtures as fx

DRIFT_SD = 0.03  # between-run drift of every cell (log sd): the 3% this machine shows between quiet runs
PLANTED = ("lsh n_hashes=1", 4096)
PLANTED_RATIO = 1.5
RUNS = (  # (run id, code version, seed of its drift)
    ("20260301T100000Z-nvidia-h100-80gb-hbm3", "v1", 1),
    ("20260301T110000Z-nvidia-h100-80gb-hbm3", "v1", 2),
    ("20260302T100000Z-nvidia-h100-80gb-hbm3", "v2", 3),
    ("20260302T110000Z-nvidia-h100-80gb-hbm3", "v2", 4),
)


def write_history(root: Path, runs: tuple[tuple[str, str, int], ...] = RUNS, planted: bool = True) -> list[Path]:
    """Store `runs` under `root`/seq_length/ (the template run is built beside them and removed)."""
    template = fx.seq_length_run(root / "_template")
    info, rows = load_run_info(template), load(template).to_dict("records")
    paths = []
    for run_id, version, seed in runs:
        rng = np.random.default_rng(seed)
        store = RunStore(root, fx.SEQ_SUITE, run_id)
        started = f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:00+00:00"
        store.write_run_info(dict(info, code_version=version, started_at=started))
        for row in rows:
            row = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
            row.update(code_version=version, cell_key=f"{row['cell_key'][:12]}{version}", run_id=run_id)
            if row["status"] == "ok":
                factor = float(np.exp(rng.normal(0.0, DRIFT_SD)))
                if planted and version == "v2" and (row["variant_label"], row["seq_len"]) == PLANTED:
                    factor *= PLANTED_RATIO
                samples = [s * factor for s in row["time_ms_samples"]]
                row.update(time_ms_samples=samples, time_ms_median=float(np.median(samples)))
            store.append(row)
        store.fold()
        paths.append(store.path)
    return paths
