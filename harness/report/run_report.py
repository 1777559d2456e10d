"""The report of one stored run: figures, `report.md` and a self-contained `index.html`.

`render_report(results, out)` reads run folders (nothing is re-run) and writes, per run,
`reports/<suite>/<run_id>/` (or `out`) with every figure as PNG and SVG, `report.md` and
`index.html` (the PNGs embedded as base64, the SVGs linked beside it). Which figures are drawn
follows from which configuration columns vary in the rows (`harness.analysis.series.sweep_axes`),
never from suite or variant names:

- `seq_len` varies: time per step, peak memory and throughput against length (log-log), with the
  paper's Fig. 5 read-offs when the run is one attention layer at the paper's 32,768 tokens/step;
- `n_layers`, `ffn_chunks` (or `d_ff` alone) vary: peak memory and time against it;
- rows with `step` and `train_bpd`/`eval_bpd`: learning curves; rows with `train_variant`,
  `eval_variant` and `accuracy`: the train-by-eval accuracy table and heat map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.series import sweep_axes, with_series
from harness.analysis.targets import run_targets
from harness.overrides import overrides_text
from harness.report.curves import training_sections
from harness.report.document import Block, Code, Document, Heading, Paragraph, Table, to_html, write_document
from harness.report.environment import environment_table
from harness.report.folders import RESULTS_ROOT, default_runs, open_run, output_folder, reports_root, shown_path, staged, writing
from harness.report.labels import failed_table, what_was_measured
from harness.report.palette import series_palette
from harness.report.sections import benchmark_sections
from harness.store.files import RUN_INFO, ResultsError, atomic_write_text
from harness.store.reader import StoredRun
from harness.store.schema import SEQ_LEN, STATUS, STEP, VARIANT_LABEL, split


def all_series(rows: pd.DataFrame) -> list[str]:
    """Every series label any figure of these rows uses (for one palette across a report)."""
    parts = split(rows)
    labels: list[str] = []
    for x in sweep_axes(parts.cells) or [SEQ_LEN]:
        labels += list(with_series(parts.cells, x)["series"])
    if not parts.curves.empty and VARIANT_LABEL in parts.curves:
        labels += list(with_series(parts.curves, STEP)["series"])
    return labels


def targets_section(run: StoredRun) -> list[Block]:
    """The suite's `checks: targets:` evaluated on this run, as `harness check RUN --targets` does."""
    try:
        found = run_targets(run)
    except ResultsError as error:
        return [Heading(level=2, text="Targets"), Paragraph(f"The suite's targets could not be evaluated: {error}")]
    if found is None:
        return []
    table, source = found
    verdict = [("inconclusive" if vague else "MET" if met else "MISSED") for met, vague in zip(table["met"], table["inconclusive"])]
    shown = table.drop(columns=["met", "inconclusive"]).assign(
        value=table["value"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "-"), verdict=verdict
    )
    met, missed = verdict.count("MET"), verdict.count("MISSED")
    text = (
        f"{met} of {len(table)} met" + (f", {missed} missed" if missed else "") + f" (from {source}; "
        "`python -m harness check RUN --targets` prints the same table and exits 1 on a miss)."
    )
    return [Heading(level=2, text="Targets"), Paragraph(text), Table(shown.set_index("target"))]


def run_document(run: StoredRun, folder: Path, palette: dict[str, Any]) -> Document:
    """Draw the figures of one run into `folder` and return its report."""
    parts = split(run.rows)
    rows = parts.without_rounds
    counts = rows[STATUS].value_counts().to_dict()
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items())
    blocks: list[Block] = [Heading(level=1, text=f"{run.suite}: {run.run_id}")]
    if run.info.get("description"):
        blocks.append(Paragraph(" ".join(str(run.info["description"]).split())))
    what = what_was_measured(parts.cells if not parts.cells.empty else rows)
    blocks.append(
        Paragraph(
            f"{len(rows)} rows ({status_text}); {what}; results: `{shown_path(run.path)}`. "
            "Rendered from the stored results (nothing re-run)."
        )
    )
    if run.corrupt:
        names = ", ".join(f"`{f.name}`" for f in run.corrupt[:10]) + (" ..." if len(run.corrupt) > 10 else "")
        blocks.append(
            Paragraph(
                f"**Warning: {len(run.corrupt)} cell file(s) could not be read and are missing from this "
                f"report:** {names} in `{shown_path(run.path / 'cells')}`. `python -m harness run SUITE --resume "
                f"{run.run_id}` measures them again."
            )
        )
    if not parts.cells.empty:
        blocks += benchmark_sections(parts.cells, folder, palette)
    blocks += training_sections(parts.curves, parts.evals, folder, palette)
    blocks += targets_section(run)
    if not parts.failed_trains.empty:
        blocks += [Heading(level=2, text="Rows that did not finish"), Table(failed_table(parts.failed_trains).set_index("series"))]
    overrides = overrides_text(run.info.get("overrides"))
    blocks += [
        Heading(level=2, text="Environment"),
        Table(environment_table(run.info, rows), left=True),
        Heading(level=2, text="Command"),
        Paragraph("The command that produced these results (run.json):"),
        Code(str(run.info.get("command") or "not recorded")),
        *((Paragraph("Suite keys overridden on the command line:"), Code(overrides)) if overrides else ()),
    ]
    return Document(f"{run.suite} {run.run_id}", blocks)


def render_report(results: list[Path | str], out: Path | None = None, root: Path | str = RESULTS_ROOT) -> Path:
    """Render reports of stored runs; nothing is re-run.

    `results`: run folders, suite folders (their latest run), run ids or results.parquet files; empty:
    the latest run of every suite under `root`. Each run goes to `reports/<suite>/<run_id>/` (the
    `reports/` beside `root`, `reports_root`), or to
    `out` for a single run (`out/<suite>/<run_id>/` for several). Returns the report folder of a single
    run, or for several the path of the `index.html` that links them. Raises ResultsError for a
    missing or unreadable results folder or file.
    """
    runs = [open_run(r, root) for r in (list(results) or default_runs(root))]
    base = Path(out) if out is not None else reports_root(root)
    folders = []
    for run in runs:
        if out is not None and len(runs) == 1:
            folder = base
        else:
            folder = output_folder(base, (run.suite, "suite name", run.path / RUN_INFO), (run.run_id, "run id", run.path))
        with writing(folder), staged(folder) as staging:
            # One palette per run, from its labels alone: the same series has the same colour in every
            # figure of the run, and in any other run or comparison whose labels are the same.
            write_document(run_document(run, staging, series_palette(all_series(run.rows))), staging)
        folders.append(folder)
    if len(runs) == 1:
        return folders[0]
    blocks: list[Block] = [Heading(level=1, text="Reports")]
    for run, folder in zip(runs, folders):
        relative = folder.relative_to(base).as_posix()
        description = " ".join(str(run.info.get("description") or "").split())
        blocks.append(Paragraph(f"[{run.suite}: {run.run_id}]({relative}/index.html) ([report.md]({relative}/report.md)). {description}"))
    index = base / "index.html"
    with writing(base):
        atomic_write_text(index, to_html(Document("Reports", blocks), base))
    return index
