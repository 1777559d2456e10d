"""`harness publish`: a static site over every run under a results root, relative links only (it works
from file:// and from any static host: a CI artifact, GitHub Pages).

    <site>/index.html                         suites x devices: runs, latest run, history, baselines
    <site>/history/<suite>/index.html         harness.report.history_report (every point links to its run)
    <site>/runs/<suite>/<run id>/index.html   each run's report (harness.report.run_report)
    <site>/baselines/<device>/<name>/index.html   each baseline's report
    <site>/compare/<suite>/<device>-<name>/index.html   the suite's latest run on that device against the baseline

The site is built beside `site` and swapped in when complete: a failed publish leaves the old site.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from harness.analysis.catalog import RunEntry, find_runs
from harness.analysis.history import METRICS, build_histories
from harness.report.compare_report import render_compare
from harness.report.document import Block, Document, Heading, Items, Paragraph, write_document
from harness.report.figure_axes import slug
from harness.report.folders import RESULTS_ROOT, writing
from harness.report.history_report import history_document, short_version
from harness.report.run_report import render_report
from harness.store.files import ResultsError

SITE_ROOT = Path("site")


def _relative(target: Path, page_folder: Path) -> str:
    """A relative POSIX link from a page in `page_folder` to `target`."""
    return Path(os.path.relpath(target, page_folder)).as_posix()


def _run_folder(site: Path, entry: RunEntry, root: Path) -> Path:
    """Where a run's report goes: runs/<suite>/<run id>/, or baselines/<device>/<name>/ for a baseline."""
    if entry.baseline:
        return site / entry.run.path.relative_to(root)
    return site / "runs" / entry.suite / entry.run.run_id


def build_site(root: Path, site: Path, echo: Callable[[str], None]) -> None:
    """Write the whole site of `root` into the empty folder `site`."""
    problems: list[str] = []
    entries = find_runs(root, problems=problems)
    if not entries:
        raise ResultsError(f"{root}: no runs to publish")
    pages: dict[str, Path] = {}  # run path -> its report folder
    for entry in entries:
        folder = _run_folder(site, entry, root)
        try:
            render_report([entry.run.path], out=folder, root=root)
        except ResultsError as error:
            problems.append(f"{entry.run.label}: report not rendered ({error})")
            continue
        pages[str(entry.run.path)] = folder
    suites = sorted({e.suite for e in entries})
    index: list[Block] = [Heading(level=1, text="Benchmark results"), Paragraph(f"{len(entries)} run(s) of {len(suites)} suite(s).")]
    for suite in suites:
        mine = [e for e in entries if e.suite == suite]
        runs = [e for e in mine if not e.baseline]
        index.append(Heading(level=2, text=suite))
        items: list[str] = []
        if runs:
            history_folder = site / "history" / suite
            histories = build_histories(runs, METRICS["time"])
            links = {
                e.run.run_id: _relative(pages[str(e.run.path)] / "index.html", history_folder) for e in runs if str(e.run.path) in pages
            }
            history_folder.mkdir(parents=True, exist_ok=True)
            write_document(history_document(histories, history_folder, links), history_folder)
            steps = sum(len(h.steps) for h in histories)
            items.append(f"[history of {suite}](history/{suite}/index.html): {len(runs)} run(s), {steps} step change(s)")
        for device in sorted({e.run.device_name for e in mine}):
            for e in [x for x in mine if x.run.device_name == device]:
                if str(e.run.path) in pages:
                    what = "baseline" if e.baseline else f"run, code {short_version(e.run.code_version)}"
                    link = _relative(pages[str(e.run.path)] / "index.html", site)
                    items.append(f"{device}: [{e.run.label if e.baseline else e.run.run_id}]({link}) ({what}, started {e.started[:16]})")
        for base in [e for e in mine if e.baseline]:
            latest = [e for e in runs if e.run.device_name == base.run.device_name]
            if not latest:
                continue
            folder = site / "compare" / suite / f"{slug(base.run.device_name)}-{base.run.path.name}"
            try:
                render_compare(base.run.path, latest[-1].run.path, out=folder, root=root)
            except ResultsError as error:
                problems.append(f"{suite}: comparison with baseline {base.run.label} not rendered ({error})")
                continue
            link = _relative(folder / "index.html", site)
            items.append(f"[latest run {latest[-1].run.run_id} against baseline {base.run.path.name}]({link}) ({base.run.device_name})")
        index.append(Items(tuple(items)))
    if problems:
        index += [Heading(level=2, text="Not published"), Items(tuple(problems))]
    for problem in problems:
        echo(f"warning: {problem}")
    write_document(Document("benchmark results", index), site)


def publish(root: str | Path = RESULTS_ROOT, site: str | Path = SITE_ROOT, echo: Callable[[str], None] = print) -> Path:
    """Publish every run under `root` as a static site into `site` (replaced as a whole); returns `site`."""
    root, site = Path(root), Path(site)
    if not root.is_dir():
        raise ResultsError(f"{root}: results folder not found")
    site.parent.mkdir(parents=True, exist_ok=True)
    with writing(site):
        building = Path(tempfile.mkdtemp(prefix=f".{site.name}.", suffix=".tmp", dir=site.parent))
        try:
            build_site(root.resolve(), building, echo)
            os.chmod(building, 0o755)
            old = None
            if site.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{site.name}.old.", dir=site.parent))
                os.replace(site, old / site.name)
            os.replace(building, site)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return site
