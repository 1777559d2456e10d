"""`harness compare A B [C ...]`: every run against the first, one column group per run: the time ratio
of every cell they share, its 95% interval and its verdict across runs.

The cells are paired by `harness.analysis.pairing.pair_runs`, the engine `harness check` judges with
its thresholds too, and judged across runs by `harness.analysis.comparison.compare_runs` (calibration
and between-run drift, harness.analysis.drift). This module only renders: a ratio figure per run, a
table, report.md and index.html.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from harness.analysis.comparison import MultiComparison, Versus, compare_runs
from harness.analysis.drift import CALIBRATION_MATMUL
from harness.analysis.pairing import INTERVAL_LEVEL, KEY, NOISE_ALPHA, TOO_FEW, configuration_differences
from harness.analysis.series import primary_axis, with_series
from harness.expressions import ExpressionError
from harness.report import figures
from harness.report.document import Block, Code, Document, Figure, Heading, Paragraph, Table, write_document
from harness.report.folders import RESULTS_ROOT, open_run, output_folder, reports_root, shown_path, staged, writing
from harness.report.labels import AXIS_TEXT, legend_names, what_was_measured
from harness.report.palette import series_palette
from harness.store.files import ResultsError
from harness.store.reader import StoredRun
from harness.store.schema import CODE_VERSION, DEVICE_NAME, STATUS_OK, split

NOISE_RULE = (
    "Noise check (`harness.analysis.pairing`, the rule `harness check` uses too): within a run, a difference is "
    f"beyond noise when a two-sided Mann-Whitney U test on the two cells' timing samples gives p < {NOISE_ALPHA}; "
    f"where the repeats are too few for that test (3 and 3: the smallest p is 0.1) it is not judged on them. Across runs "
    "(`harness.analysis.drift`) each ratio is first calibrated (each run's median matmul rate, or reference cells), then "
    "tested against the between-run drift, a t distribution (3 df) whose scale comes from runs of the same code version "
    "where there are several, else from the spread of all cells' ratios, with the bootstrap spread of the samples "
    f"added: beyond noise when p < {NOISE_ALPHA} (and the within-run test does not say within). The "
    f"{INTERVAL_LEVEL:.0%} interval beside each ratio is the same model's (so a cell whose interval just excludes 1 can "
    f"still be within noise at p < {NOISE_ALPHA}); without a drift estimate, a seeded bootstrap over the stored samples. "
    "Peak memory is one measurement per cell: its ratio has no noise estimate."
)
LETTERS = string.ascii_uppercase


def _shown(value: Any, digits: str = ".3f") -> str:
    return "" if value is None or pd.isna(value) else f"{value:{digits}}"


def interval_text(low: Any, high: Any) -> str:
    """An interval as "0.95-1.07" ("" when unknown)."""
    return f"{low:.3f}-{high:.3f}" if low is not None and high is not None and math.isfinite(low) and math.isfinite(high) else ""


def _noise_text(noise: str, within: Any, vague: bool) -> str:
    if vague:
        return "inconclusive (contended)"
    if noise == TOO_FEW:
        return "too few repeats"
    return "" if within is None or pd.isna(within) else ("yes" if within else "NO")


def _reason(value: Any) -> str:
    return value if isinstance(value, str) and value else "-"


def run_frames(multi: MultiComparison) -> list[pd.DataFrame]:
    """Each other run's judged pairs (`Versus.frame`), with a `series` column on one shared x axis."""
    frames = [versus.frame() for versus in multi.others]
    x = primary_axis(pd.concat(frames, ignore_index=True))
    return [with_series(frame, x) for frame in frames]


def compare_table(frames: Sequence[pd.DataFrame], x: str) -> pd.DataFrame:
    """Series, `x`, A's time (or status), then per other run: its time, ratio to A, interval, verdict,
    p and memory ratio, on the cells of the first comparison (others joined on the cell's key)."""
    first = frames[0]
    table = pd.DataFrame(
        {
            "series": first["series"],
            x: first[x],
            "A time (ms)": first["time_ms_median_a"].where(first["status_a"] == STATUS_OK, first["status_a"].str.upper()),
        }
    )
    for letter, frame in zip(LETTERS[1:], frames):
        frame = frame.set_index(KEY).reindex(first[KEY]).reset_index()
        name = "B/A" if len(frames) == 1 else f"{letter}/A"
        table[f"{letter} time (ms)"] = frame["time_ms_median_b"].where(frame["status_b"] == STATUS_OK, frame["status_b"].str.upper()).values
        table[f"{name} time"] = frame["ratio"].map(_shown).values
        table[f"{name} {INTERVAL_LEVEL:.0%} interval"] = [interval_text(lo, hi) for lo, hi in zip(frame["ci_low"], frame["ci_high"])]
        table["within noise" if len(frames) == 1 else f"{letter} within noise"] = [
            _noise_text(n, w, bool(v)) for n, w, v in zip(frame["noise"], frame["within_noise"], frame["inconclusive"])
        ]
        table["p" if len(frames) == 1 else f"{letter} p"] = frame["p_value"].map(lambda v: _shown(v, ".2g")).values
        table[f"{name} memory"] = frame["memory_ratio"].map(_shown).values
    return table.set_index("series")


def summary_text(versus: Versus, frame: pd.DataFrame, letter: str = "B") -> str:
    """One paragraph for one run against A: cells matched, finished in both, beyond noise,
    inconclusive, too few repeats, cells only one run has, and what the verdicts account for."""
    pairing = versus.pairing
    finished = frame[frame["status_a"].eq(STATUS_OK) & frame["status_b"].eq(STATUS_OK)]
    beyond = int(finished["within_noise"].eq(False).sum())
    vague = int(finished["inconclusive"].sum())
    too_few = int((finished["noise"] == TOO_FEW).sum())
    only_a, only_b = len(pairing.only_a), len(pairing.only_b)
    return (
        f"{letter} against A: {len(frame)} cells matched on their configuration (`config_key`: workload, mode, device, dtype, "
        f"length, batch, variant and its parameters, model sizes; not the code version); {len(finished)} finished in both, "
        f"{beyond} of them differ beyond noise"
        + (
            f", {vague} inconclusive: contended in A or {letter} (other load disturbed the timing), so neither within noise nor beyond it"
            if vague
            else ""
        )
        + (f", {too_few} with too few repeats for the test to tell" if too_few else "")
        + (f"; {only_a} cell(s) only in A and {only_b} only in {letter}, not compared" if only_a or only_b else "")
        + f". Intervals and verdicts: {versus.basis}. A ratio below 1 means {letter} is faster."
    )


def compare_document(multi: MultiComparison, folder: Path) -> tuple[Document, list[str]]:
    """Draw a ratio figure per other run into `folder`; return the comparison's document and its summary
    lines (per run: the summary, then one line per inconclusive cell with its reasons)."""
    frames = run_frames(multi)
    x = primary_axis(pd.concat(frames, ignore_index=True))
    a = multi.reference
    palette = series_palette(pd.concat([f["series"] for f in frames]))
    lines: list[str] = []
    blocks: list[Block] = [Heading(level=1, text="Compare: " + " / ".join(v.run.run_id for v in multi.others) + f" against {a.run_id}")]

    def run_line(name: str, run: StoredRun) -> str:
        device = (run.info.get("environment") or {}).get(DEVICE_NAME, "?")
        return f"{name}: `{shown_path(run.path)}` ({device}, {run.info.get(CODE_VERSION, '?')})"

    runs = [a, *(v.run for v in multi.others)]
    blocks.append(Paragraph("; ".join(run_line(letter, run) for letter, run in zip(LETTERS, runs)) + "."))
    summaries = []
    for index, (versus, frame) in enumerate(zip(multi.others, frames)):
        letter = LETTERS[index + 1]
        summary = summary_text(versus, frame, letter)
        summaries.append(summary)
        lines.append(summary)
        vague = frame[frame["inconclusive"]]
        lines += [
            f"inconclusive: {r['series']} {x}={r[x]}: "
            + "; ".join(
                f"{side} {reason}"
                for side, reason in (("A", r["contention_a"]), (letter, r["contention_b"]))
                if isinstance(reason, str) and reason
            )
            for _, r in vague.iterrows()
        ]
    blocks += [Paragraph(text) for text in summaries] + [Paragraph(NOISE_RULE)]
    title_name, names = legend_names(frames[0])
    for index, (versus, frame) in enumerate(zip(multi.others, frames)):
        letter = LETTERS[index + 1]
        fig = figures.plot_ratio(
            frame,
            x,
            palette,
            title=f"Median time per step, {letter} / A ({what_was_measured(frame)})",
            subtitle=f"A = {a.suite}/{a.run_id}\n{letter} = {versus.run.suite}/{versus.run.run_id}",
            names=names,
            x_label=AXIS_TEXT.get(x, (x, x))[1],
            legend_title=title_name,
            y_label=f"time ratio {letter} / A",
        )
        stem = "time_ratio" if len(frames) == 1 else f"time_ratio_{letter.lower()}"
        figures.save(fig, folder, stem)
        vague = frame[frame["inconclusive"]]
        caption = f"Median time {letter} / A per matched cell (calibrated as the table says); hollow markers: within noise"
        caption += f"; crossed hollow markers: inconclusive (contended in A or {letter})" if len(vague) else ""
        caption += "; no marker: too few repeats to tell" if (frame["noise"] == TOO_FEW).any() else ""
        blocks.append(Figure(stem, caption + "."))
    blocks.append(Table(compare_table(frames, x)))
    for index, frame in enumerate(frames):
        vague = frame[frame["inconclusive"]]
        if len(vague):
            letter = LETTERS[index + 1]
            inconclusive = pd.DataFrame(
                {
                    "series": vague["series"],
                    x: vague[x],
                    "A contention": vague["contention_a"].map(_reason),
                    f"{letter} contention": vague["contention_b"].map(_reason),
                }
            ).set_index("series")
            blocks += [
                Heading(level=2, text="Inconclusive cells (contended)" + (f": {letter}" if len(frames) > 1 else "")),
                Table(inconclusive),
            ]
    blocks += [
        Heading(level=2, text="Commands"),
        Code("\n".join(f"{letter}: {run.info.get('command', '?')}" for letter, run in zip(LETTERS, runs))),
    ]
    title = "compare " + " ".join(run.run_id for run in runs)
    return Document(title, blocks), lines


def render_compare(
    *runs: Path | str,
    out: Path | None = None,
    root: Path | str = RESULTS_ROOT,
    echo: Callable[[str], None] | None = None,
    calibration: str = CALIBRATION_MATMUL,
    reference: str | None = None,
) -> Path:
    """Render every run against the first (figures, table, report.md, index.html) into `out`
    (default `reports/compare/<A>-vs-<B>[-vs-<C>...]/`); returns that folder. `echo` gets the summary
    lines. `calibration` / `reference`: see harness.analysis.comparison. ResultsError when a run has
    no benchmark rows, a run shares no cell with the first, or `reference` is not a valid selection."""
    if len(runs) < 2:
        raise ResultsError("compare needs at least two runs")
    if len(runs) > len(LETTERS):
        raise ResultsError(f"compare takes at most {len(LETTERS)} runs")
    stored = [open_run(run, root) for run in runs]
    cells = [split(run.rows).cells for run in stored]
    if any(frame.empty for frame in cells):
        raise ResultsError("compare needs benchmark rows (timings) in every run")
    try:
        multi = compare_runs(stored, calibration, reference)
    except ExpressionError as error:
        raise ResultsError(f"--reference: {error}") from None
    for versus, frame in zip(multi.others, cells[1:]):
        if not versus.pairing.matched:
            differing = configuration_differences(cells[0], frame)
            raise ResultsError(
                f"{stored[0].run_id} and {versus.run.run_id}: the two runs have no cells with the same configuration"
                + (f" (they differ in: {', '.join(differing)})" if differing else "")
            )
    name = "-vs-".join(run.run_id for run in stored)
    folder = Path(out) if out is not None else output_folder(reports_root(root) / "compare", (name, "run ids", stored[0].path))
    with writing(folder), staged(folder) as staging:
        document, lines = compare_document(multi, staging)
        write_document(document, staging)
    for line in lines if echo is not None else ():
        echo(line)  # type: ignore[misc]
    return folder
