"""Reports: everything the harness writes or prints for people, built as documents.

    document.py        the document model (headings, paragraphs, tables, figures, code, lists) and its
                       renderers: Markdown, HTML, terminal text, JSON
    run_report.py      `render_report`: one run's figures, report.md and index.html
    compare_report.py  `render_compare`: the B / A ratio of every cell two runs share (pairs from
                       harness.analysis.pairing)
    sections.py        a benchmark run's sections; curves.py a training run's; environment.py the
                       environment table; labels.py the words (axis names, legends, subtitles)
    figures.py         the plots; figure_axes.py their shared axes and markers; palette.py colours
    folders.py         opening runs, output folders, staged writes, paths as reports name them

The report reads runs and analyses (harness.analysis); it never imports the check layer. The two
entry points are importable from here (loaded on first use, so that importing the document model
does not load matplotlib).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "render_report":
        from harness.report.run_report import render_report

        return render_report
    if name == "render_compare":
        from harness.report.compare_report import render_compare

        return render_compare
    raise AttributeError(f"module 'harness.report' has no attribute {name!r}")
