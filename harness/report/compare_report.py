"""`harness compare A B`: the B / A time ratio of every cell two runs share, with its noise verdict.

The cells are paired by `harness.analysis.pairing.pair_runs`, the engine `harness check` judges
with its thresholds too, so both commands pair exactly the same cells and call the same cells
within noise. This module only renders the pairs: a figure, a table, report.md and index.html.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from harness.analysis.pairing import NOISE_ALPHA, TOO_FEW, Pairing, configuration_differences, pair_runs
from harness.analysis.series import primary_axis, with_series
from harness.report import figures
from harness.report.document import Block, Code, Document, Figure, Heading, Paragraph, Table, write_document
from harness.report.folders import RESULTS_ROOT, open_run, output_folder, reports_root, shown_path, staged, writing
from harness.report.labels import AXIS_TEXT, legend_names, what_was_measured
from harness.report.palette import series_palette
from harness.store.files import ResultsError
from harness.store.reader import StoredRun
from harness.store.schema import CODE_VERSION, DEVICE_NAME, STATUS_OK, split

NOISE_RULE = (
    "Noise check (`harness.analysis.pairing`, the rule `harness check` uses too): a difference is beyond noise "
    f"when a two-sided Mann-Whitney U test on the two cells' timing samples gives p < {NOISE_ALPHA}; where the "
    f"repeats are too few for the test to reach p < {NOISE_ALPHA} at all (3 and 3: the smallest p is 0.1), the "
    'cell is marked "too few repeats" instead of being judged. Peak memory is one measurement per cell: its '
    "ratio has no noise estimate."
)


def _shown(value: Any, digits: str = ".3f") -> str:
    return "" if value is None or pd.isna(value) else f"{value:{digits}}"


def _noise_text(noise: str, within: Any, vague: bool) -> str:
    if vague:
        return "inconclusive (contended)"
    if noise == TOO_FEW:
        return "too few repeats"
    return "" if within is None or pd.isna(within) else ("yes" if within else "NO")


def _reason(value: Any) -> str:
    return value if isinstance(value, str) and value else "-"


def compare_table(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """Series, `x`, both times (or statuses), B/A time, the noise verdict, p, B/A memory."""
    return pd.DataFrame(
        {
            "series": frame["series"],
            x: frame[x],
            "A time (ms)": frame["time_ms_median_a"].where(frame["status_a"] == STATUS_OK, frame["status_a"].str.upper()),
            "B time (ms)": frame["time_ms_median_b"].where(frame["status_b"] == STATUS_OK, frame["status_b"].str.upper()),
            "B/A time": frame["ratio"].map(_shown),
            "within noise": [_noise_text(n, w, v) for n, w, v in zip(frame["noise"], frame["within_noise"], frame["inconclusive"])],
            "Mann-Whitney p": frame["p_value"].map(lambda v: _shown(v, ".2g")),
            "B/A memory": frame["memory_ratio"].map(_shown),
        }
    ).set_index("series")


def summary_text(pairing: Pairing, frame: pd.DataFrame) -> str:
    """One paragraph: cells matched, finished in both, beyond noise, inconclusive, too few repeats,
    cells only one run has."""
    finished = frame[frame["status_a"].eq(STATUS_OK) & frame["status_b"].eq(STATUS_OK)]
    beyond = int(finished["within_noise"].eq(False).sum())
    vague = int(finished["inconclusive"].sum())
    too_few = int((finished["noise"] == TOO_FEW).sum())
    only_a, only_b = len(pairing.only_a), len(pairing.only_b)
    return (
        f"{len(frame)} cells matched on their configuration (`config_key`: workload, mode, device, dtype, length, batch, "
        f"variant and its parameters, model sizes; not the code version); {len(finished)} finished in both, {beyond} of "
        "them differ beyond noise"
        + (
            f", {vague} inconclusive: contended in A or B (other load disturbed the timing), so neither within noise nor beyond it"
            if vague
            else ""
        )
        + (f", {too_few} with too few repeats for the test to tell" if too_few else "")
        + (f"; {only_a} cell(s) only in A and {only_b} only in B, not compared" if only_a or only_b else "")
        + ". A ratio below 1 means B is faster."
    )


def compare_document(a: StoredRun, b: StoredRun, pairing: Pairing, folder: Path) -> tuple[Document, list[str]]:
    """Draw the ratio figure into `folder`; return the comparison's document and its summary lines
    (the summary, then one line per inconclusive cell with its reasons)."""
    frame = pairing.frame()
    x = primary_axis(frame)
    frame = with_series(frame, x)
    palette = series_palette(frame["series"])
    title_name, names = legend_names(frame)
    fig = figures.plot_ratio(
        frame,
        x,
        palette,
        title=f"Median time per step, B / A ({what_was_measured(frame)})",
        subtitle=f"A = {a.suite}/{a.run_id}\nB = {b.suite}/{b.run_id}",
        names=names,
        x_label=AXIS_TEXT.get(x, (x, x))[1],
        legend_title=title_name,
    )
    figures.save(fig, folder, "time_ratio")
    vague = frame[frame["inconclusive"]]
    summary = summary_text(pairing, frame)
    lines = [summary] + [
        f"inconclusive: {r['series']} {x}={r[x]}: "
        + "; ".join(
            f"{side} {reason}"
            for side, reason in (("A", r["contention_a"]), ("B", r["contention_b"]))
            if isinstance(reason, str) and reason
        )
        for _, r in vague.iterrows()
    ]

    def run_line(name: str, run: StoredRun) -> str:
        device = (run.info.get("environment") or {}).get(DEVICE_NAME, "?")
        return f"{name}: `{shown_path(run.path)}` ({device}, {run.info.get(CODE_VERSION, '?')})"

    inconclusive = pd.DataFrame(
        {
            "series": vague["series"],
            x: vague[x],
            "A contention": vague["contention_a"].map(_reason),
            "B contention": vague["contention_b"].map(_reason),
        }
    ).set_index("series")
    caption = "Median time B / A per matched cell; hollow markers: within noise"
    caption += "; crossed hollow markers: inconclusive (contended in A or B)" if len(vague) else ""
    caption += "; no marker: too few repeats to tell" if (frame["noise"] == TOO_FEW).any() else ""
    blocks: list[Block] = [
        Heading(level=1, text=f"Compare: {b.run_id} / {a.run_id}"),
        Paragraph(f"{run_line('A', a)}; {run_line('B', b)}."),
        Paragraph(summary),
        Paragraph(NOISE_RULE),
        Figure("time_ratio", caption + "."),
        Table(compare_table(frame, x)),
        *([Heading(level=2, text="Inconclusive cells (contended)"), Table(inconclusive)] if len(vague) else []),
        Heading(level=2, text="Commands"),
        Code(f"A: {a.info.get('command', '?')}\nB: {b.info.get('command', '?')}"),
    ]
    return Document(f"compare {a.run_id} {b.run_id}", blocks), lines


def render_compare(
    run_a: Path | str,
    run_b: Path | str,
    out: Path | None = None,
    root: Path | str = RESULTS_ROOT,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Render the B/A time ratio per paired cell of two runs (figure, table, report.md, index.html)
    into `out` (default `reports/compare/<run_a>-vs-<run_b>/`); returns that folder. `echo` gets the
    summary lines (cells matched, beyond noise, inconclusive ones with their reasons). ResultsError
    when a run has no benchmark rows or the runs share no cell."""
    a, b = open_run(run_a, root), open_run(run_b, root)
    bench_a, bench_b = split(a.rows).cells, split(b.rows).cells
    if bench_a.empty or bench_b.empty:
        raise ResultsError("compare needs benchmark rows (timings) in both runs")
    pairing = pair_runs(a.rows, b.rows)
    if not pairing.matched:
        differing = configuration_differences(bench_a, bench_b)
        raise ResultsError(
            "the two runs have no cells with the same configuration" + (f" (they differ in: {', '.join(differing)})" if differing else "")
        )
    folder = (
        Path(out) if out is not None else output_folder(reports_root(root) / "compare", (f"{a.run_id}-vs-{b.run_id}", "run ids", a.path))
    )
    with writing(folder), staged(folder) as staging:
        document, lines = compare_document(a, b, pairing, staging)
        write_document(document, staging)
    for line in lines if echo is not None else ():
        echo(line)  # type: ignore[misc]
    return folder
