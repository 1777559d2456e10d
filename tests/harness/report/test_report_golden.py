"""`harness report` of committed runs against the report.md the code rendered before the #29 move.

tests/data/report_golden/<suite>.md were rendered by `python -m harness report results/<run> --out ...`
from the repository root at commit 63554f4, before the row schema, the pairing engine and the
document model were moved into packages. The same runs rendered by today's code must give the same
text, apart from lines that name paths (the results folder and the recorded command line).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "tests" / "data" / "report_golden"
RUNS = {
    "seq_length": "results/seq_length/20261204T023122Z-amd-epyc",  # a benchmark suite
    "duplication": "results/duplication/20261204T024229Z-amd-epyc",  # a training suite (accuracy)
    "reversible": "results/reversible/20261204T023016Z-amd-epyc",  # a training suite (bits per dim)
}


def without_paths(text: str) -> list[str]:
    """The report's lines with every path masked: backticked results folders, --out arguments and
    absolute paths in parentheses (the CPU kernel's cache file: today's report shows its name only)."""
    text = re.sub(r"`[^`\n]*results/[^`\n]*`", "`<results>`", text)
    text = re.sub(r"\((?:/[^/()\s]+)+/([^/()\s]+)\)", r"(\1)", text)
    text = re.sub(r"--out \S+", "--out <out>", text)
    return text.splitlines()


@pytest.mark.parametrize("suite", sorted(RUNS))
def test_a_committed_run_renders_the_report_it_rendered_before_the_move(suite: str, tmp_path: Path) -> None:
    out = tmp_path / suite
    done = subprocess.run(
        [sys.executable, "-m", "harness", "report", RUNS[suite], "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert without_paths(report) == without_paths((GOLDEN / f"{suite}.md").read_text())
    # Nothing in it names the machine that made it, but the command line recorded in run.json.
    named = [line for line in report.splitlines() if re.search(r"/(root|home|work|tmp)/", line) and "python -m harness" not in line]
    assert not named, named
