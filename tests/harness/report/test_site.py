"""`harness runs`, `harness history` and `harness publish` as a person uses them, on runs at two code
versions with a planted 1.5x slowdown (tests/harness/analysis/history_fixtures.py): the listing, the
step and the --fail-on-step gate, and a published site that opens in headless Chromium with no console
message, every link resolving and the planted step on the history page (screenshot kept under the test's
tmp folder: <tmp>/site.png)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import cli
from tests.harness.analysis import history_fixtures as hx


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    root = base / "results"
    hx.write_history(root)
    assert cli.main(["publish", "--out", str(root), "--site", str(base / "site")]) == 0
    return root, base / "site"


def test_runs_lists_every_run_with_its_counts(published, capsys):
    root, _ = published
    assert cli.main(["runs", "--out", str(root), "--suite", "seq_length"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(hx.RUNS) and lines[0].split()[:4] == ["suite", "run", "device", "code"]
    for line, (run_id, version, _) in zip(lines[1:], hx.RUNS):
        assert line.split()[:2] == ["seq_length", run_id] and f" {version} " in line
        assert re.search(r"\s35\s+1\s+0\s+0\s*$", line), line  # 35 ok, 1 oom (full at 32K), none contended or unfinished


def test_history_prints_the_step_and_fails_on_it_only_when_asked(published, tmp_path, capsys):
    root, _ = published
    assert cli.main(["history", "seq_length", "--out", str(root), "--report", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "1 step change(s) beyond noise and beyond 10%" in out and f"WORSE: {hx.PLANTED[0]} seq_len={hx.PLANTED[1]}: 1.5" in out
    assert "| **WORSE** |" in (tmp_path / "h" / "report.md").read_text()
    assert cli.main(["history", "seq_length", "--out", str(root), "--report", str(tmp_path / "h"), "--fail-on-step"]) == 1
    assert (
        cli.main(["history", "seq_length", "--out", str(root), "--report", str(tmp_path / "h"), "--threshold", "0.6", "--fail-on-step"])
        == 0
    )
    assert cli.main(["history", "nothing", "--out", str(root)]) == 2
    assert cli.main(["history", "seq_length", "--out", str(root), "--metric", "nonsense"]) == 2
    assert cli.main(["history", "seq_length", "--out", str(root), "--filter", "import os"]) == 2


def links_of(site: Path) -> list[tuple[Path, str]]:
    """(page, link) of every href/src in the site's HTML and every xlink:href in its SVGs (data: URIs aside)."""
    out = []
    for page in site.rglob("*.html"):
        out += [(page, url) for url in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()) if not url.startswith(("data:", "#"))]
    for svg in site.rglob("*.svg"):
        out += [(svg, url) for url in re.findall(r'xlink:href="([^"]+)"', svg.read_text()) if not url.startswith(("data:", "#"))]
    return out


def test_every_link_of_the_site_is_relative_and_resolves(published):
    _, site = published
    links = links_of(site)
    assert len(links) > 20
    bad = [(str(page), url) for page, url in links if re.match(r"[a-z]+:|/", url) or not (page.parent / url).resolve().exists()]
    assert bad == []
    history = (site / "history" / "seq_length" / "index.html").read_text()
    runs = {url for page, url in links if page.name.endswith(".svg") and "history" in page.parts}
    assert {f"../../runs/seq_length/{run_id}/index.html" for run_id, _, _ in hx.RUNS} == runs  # every point links to its run
    assert "1 step change(s)" in history and "<strong>WORSE</strong>" in history
    index = (site / "index.html").read_text()
    assert 'href="history/seq_length/index.html"' in index and index.count('href="runs/seq_length/') == len(hx.RUNS)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_site_opens_in_headless_chromium(published, tmp_path):
    _, site = published

    def chromium(page: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                *extra,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    pages = [site / "index.html", site / "history" / "seq_length" / "index.html", *sorted((site / "runs").rglob("index.html"))[:1]]
    for page in pages:
        result = chromium(page, "--dump-dom")
        assert "</html>" in result.stdout, result.stderr[-2000:]
        assert "CONSOLE" not in result.stderr, [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    dom = chromium(pages[1], "--dump-dom").stdout
    step = re.search(r"<tr>(.*?WORSE.*?)</tr>", dom)
    assert step and f"{hx.PLANTED[0]} seq_len={hx.PLANTED[1]}" in step.group(1)
    shot = tmp_path / "site.png"
    chromium(pages[1], f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.stat().st_size > 10_000
