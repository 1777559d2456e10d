"""A run folder someone sends you is data: crafted run folders give report, status, check and
compare a clean exit 2 naming the file and the problem (never a traceback, a hang or a file written
outside its place), and user text reaches report.md and index.html as text, never as markup."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from xml.etree import ElementTree

import pandas as pd
import pytest

from harness import cli
from harness.report import render_report
from harness.store.files import CELLS_DIR, PARQUET, RUN_INFO
from harness.store.writer import RunStore
from harness.suites import load_suite
from tests.harness.check.test_regression import SUITE, make_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A small finished run (6 cells, parquet folded) to copy and spoil."""
    root = tmp_path_factory.mktemp("results")
    suite = root / "synthetic.yaml"
    suite.write_text(SUITE)
    path = make_run(root, "r1", load_suite(suite).cells(), extra={})
    RunStore(root, "synthetic", "r1").fold()
    return path


def copy_run(finished: Path, tmp_path: Path, name: str = "crafted") -> Path:
    run = tmp_path / "results" / "synthetic" / name
    shutil.copytree(finished, run)
    return run


def commands(run: Path, good: Path, out: Path) -> dict[str, list[str]]:
    return {
        "report": ["report", str(run), "--out", str(out / "report")],
        "status": ["status", str(run)],
        "check": ["check", str(run), "--baseline", str(good)],
        "compare": ["compare", str(good), str(run), "--out", str(out / "compare")],
    }


def run_all(capsys, run: Path, good: Path, out: Path) -> dict[str, tuple[int, str]]:
    results = {}
    for name, argv in commands(run, good, out).items():
        begin = time.monotonic()
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert time.monotonic() - begin < 60, f"{name} took too long"
        assert "Traceback" not in err, err
        results[name] = (code, err)
    return results


def write_json(path: Path, data) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def spoil_run_json(**fields):
    def spoil(run: Path) -> None:
        info = json.loads((run / RUN_INFO).read_text())
        write_json(run / RUN_INFO, {**info, **fields})

    return spoil


def spoil_parquet(change):
    def spoil(run: Path) -> None:
        frame = pd.read_parquet(run / PARQUET)
        change(frame).to_parquet(run / PARQUET)

    return spoil


def replace_with_fifo(name: str):
    def spoil(run: Path) -> None:
        (run / name).unlink()
        os.mkfifo(run / name)

    return spoil


def replace_with_link(name: str, target: str):
    def spoil(run: Path) -> None:
        (run / name).unlink()
        (run / name).symlink_to(target)

    return spoil


# case -> (spoil, what stderr names: the file and the problem); every command exits 2
EXIT_2 = {
    "run.json nested 100,000 deep": (
        lambda run: write_json(run / RUN_INFO, '{"suite": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ["run.json", "JSON nested 100001 levels deep"],
    ),
    "run.json not an object": (lambda run: write_json(run / RUN_INFO, [1, 2]), ["run.json", "expected a JSON object"]),
    "environment a list": (spoil_run_json(environment=["x"]), ["run.json", "'environment' must be an object"]),
    "cell_keys a number": (spoil_run_json(cell_keys=3), ["run.json", "'cell_keys' must be an array"]),
    "cell_keys with a path": (spoil_run_json(cell_keys=["../../x"]), ["run.json", "is not a plain name"]),
    "description an object": (spoil_run_json(description={"a": 1}), ["run.json", "'description' must be a string"]),
    "overrides a number": (spoil_run_json(overrides=5), ["run.json", "'overrides' must be an array"]),
    "suite a parent path": (spoil_run_json(suite="../../../../x"), ["run.json", "field 'suite' '../../../../x' is not a plain name"]),
    "suite an absolute path": (spoil_run_json(suite="/tmp/webroot"), ["run.json", "is not a plain name"]),
    "run.json a FIFO": (replace_with_fifo(RUN_INFO), ["run.json", "FIFO"]),
    "run.json a link to /dev/zero": (replace_with_link(RUN_INFO, "/dev/zero"), ["run.json", "character device"]),
    "run.json not UTF-8": (lambda run: (run / RUN_INFO).write_bytes(b"\xff\xfe{}"), ["run.json", "not UTF-8"]),
    "status as integers": (spoil_parquet(lambda f: f.assign(status=1)), [PARQUET, "column 'status' must hold text"]),
    "seq_len as text": (spoil_parquet(lambda f: f.assign(seq_len="long")), [PARQUET, "column 'seq_len' must hold numbers"]),
    "cell_key with a path": (spoil_parquet(lambda f: f.assign(cell_key="../../x")), [PARQUET, "is not a plain name"]),
    "time an infinity": (spoil_parquet(lambda f: f.assign(time_ms_median=float("inf"))), [PARQUET, "'time_ms_median' holds an infinite"]),
    "repeats an infinity": (spoil_parquet(lambda f: f.assign(n_repeats=float("inf"))), [PARQUET, "'n_repeats' holds an infinite"]),
    "parquet a link to /dev/zero": (replace_with_link(PARQUET, "/dev/zero"), [PARQUET, "character device"]),
    "parquet a FIFO": (replace_with_fifo(PARQUET), [PARQUET, "FIFO"]),
}


@pytest.mark.parametrize("case", sorted(EXIT_2))
def test_crafted_run_folders_exit_2_naming_the_file(case, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    spoil, expected = EXIT_2[case]
    spoil(run)
    for name, (code, err) in run_all(capsys, run, finished, tmp_path / "out").items():
        assert code == 2 and all(text in err for text in expected), (name, err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no half-written report, no figures
    assert not (tmp_path / "x").exists() and not Path("/tmp/webroot").exists()


@pytest.mark.parametrize(
    "jobs",
    ["[]", '{"submissions": 3}', '{"submissions": [{"jobs": [{"job_id": 1}]}]}', '{"submissions": [7]}', "{", "[" * 50_000],
)
def test_a_malformed_jobs_json_is_exit_2_for_status_and_ignored_by_the_others(jobs, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "jobs.json").write_text(jobs)
    results = run_all(capsys, run, finished, tmp_path / "out")
    assert results["status"][0] == 2 and "jobs.json" in results["status"][1]
    assert all(results[name][0] == 0 for name in ("report", "check", "compare")), results


def test_a_fifo_or_device_among_the_cell_files_is_named_not_read(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / CELLS_DIR).mkdir(exist_ok=True)
    os.mkfifo(run / CELLS_DIR / "fifo.json")
    (run / CELLS_DIR / "zero.json").symlink_to("/dev/zero")
    results = run_all(capsys, run, finished, tmp_path / "out")
    assert {name: code for name, (code, _) in results.items()} == {"report": 0, "status": 0, "check": 0, "compare": 0}
    assert "fifo.json: unreadable cell file" in results["report"][1] and "zero.json" in results["report"][1]


def test_a_journal_key_with_a_path_never_deletes_outside_the_run(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    write_json(run / CELLS_DIR / "evil.json", {"cell_key": "../../../../victim", "status": "ok"})
    RunStore(run.parent.parent, run.parent.name, run.name).fold()
    assert victim.exists() and (run / CELLS_DIR / "evil.json").exists()  # unreadable as a row: kept, named
    code = cli.main(["status", str(run)])
    assert code == 0 and "evil.json" in capsys.readouterr().out


def test_report_paths_come_from_plain_names_only(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    report = render_report([run], root=tmp_path / "results")
    assert report == tmp_path / "reports" / "synthetic" / "crafted" and (report / "report.md").exists()


@pytest.mark.parametrize("where", ["a file", "a read-only place"])
def test_report_and_compare_out_that_cannot_be_written_exit_2(where, finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    if where == "a file":
        out.write_text("not a folder")
    else:
        import errno

        from harness.store import files

        def read_only(path, data):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(files, "atomic_write_bytes", read_only)
    for argv in (["report", str(finished), "--out", str(out)], ["compare", str(finished), str(finished), "--out", str(out)]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"cannot write to {out}" in err and "Traceback" not in err, err
    assert not out.is_dir() or not (out / "report.md").exists()


PAYLOADS = {
    "description": "click [here](javascript:alert(1)) or [there](data:text/html,<script>alert(2)</script>) <script>alert(3)</script>",
    "label": "<img src=x onerror=alert(4)>",
    "message": "DataError: cannot read <img src=x onerror=alert(5)>.bin",
}


def test_user_text_reaches_the_report_as_text(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    info = json.loads((run / RUN_INFO).read_text())
    write_json(run / RUN_INFO, {**info, "description": PAYLOADS["description"]})
    frame = pd.read_parquet(run / PARQUET)
    frame.loc[0, "variant_label"] = PAYLOADS["label"]
    frame.loc[1, ["status", "message"]] = ["error", PAYLOADS["message"]]
    frame.to_parquet(run / PARQUET)
    folder = render_report([run], out=tmp_path / "report")
    markdown, page = (folder / "report.md").read_text(), (folder / "index.html").read_text()
    for text in (markdown, page):
        assert "<script" not in text and "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(4)>" in markdown and "&lt;script>alert(3)" in markdown  # shown, not run
    assert "\\[here\\](javascript:alert(1))" in markdown and "\\[there\\](data:" in markdown  # not links
    assert 'href="javascript' not in page and 'href="data' not in page and "&lt;img src=x onerror=alert(5)&gt;.bin" in page


def test_control_characters_from_a_run_reach_the_terminal_escaped(finished, tmp_path, capsys):
    """A label and an error message with terminal escapes (retitle, clear, cursor up, CR) print as
    escapes in status, check and compare, never as the bytes that would act on the terminal; the
    report's Markdown, HTML and figures show them escaped too (an SVG with one would not be XML)."""
    run = copy_run(finished, tmp_path)
    frame = pd.read_parquet(run / PARQUET)
    frame.loc[0, ["variant_label", "status", "message"]] = ["lsh\x1b]0;owned\x07", "error", "boom\r\x1b[1A\x1b[2Kall fine"]
    frame.loc[2, "variant_label"] = "$\\frac{$"  # math text that does not parse: the figures used to raise on it
    frame.to_parquet(run / PARQUET)
    info = json.loads((run / RUN_INFO).read_text())
    write_json(run / RUN_INFO, {**info, "environment": {**info.get("environment", {}), "device_name": "cpu\x1b[2J"}})
    history = ["history", "synthetic", "--out", str(tmp_path / "results"), "--report", str(tmp_path / "out" / "history")]
    printed = {}
    for name, argv in [*commands(run, finished, tmp_path / "out").items(), ("history", history)]:
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 1, 2) and "Traceback" not in err, (name, err)
        assert code == 0 or name in ("check", "compare"), (name, err)  # those two: the device differs from the good run's
        printed[name] = out + err
    for name, text in printed.items():
        assert not any(ch in text for ch in "\x1b\x07\r"), (name, text)
    assert "lsh\\x1b]0;owned\\x07 L=512 B=1: boom" in printed["status"]  # a message's first line
    assert "synthetic on cpu\\x1b[2J" in printed["history"]
    report = tmp_path / "out" / "report"
    for page in (report / "report.md", report / "index.html"):
        assert not any(ch in page.read_text() for ch in "\x1b\x07"), page
    assert "lsh\\x1b\\]0;owned\\x07" in (report / "report.md").read_text()  # escaped, and the bracket as Markdown
    figures = sorted(report.glob("*.svg"))
    assert figures and all(ElementTree.parse(svg) for svg in figures)


def test_recorded_overrides_reach_the_report_as_a_code_block(finished, tmp_path):
    """run.json's `overrides` (the --set arguments) are shown verbatim in a fence no backtick can close."""
    run = copy_run(finished, tmp_path)
    info = json.loads((run / RUN_INFO).read_text())
    hostile = "a=```\n<img src=x onerror=alert(6)>"
    write_json(run / RUN_INFO, {**info, "overrides": [{"set": hostile}, "not an object"]})
    folder = render_report([run], out=tmp_path / "report")
    markdown, page = (folder / "report.md").read_text(), (folder / "index.html").read_text()
    fence = "````"  # longer than the payload's own run of three backticks
    block = markdown.split("Suite keys overridden on the command line:")[1].split(fence)
    assert "<img src=x onerror=alert(6)>" in block[1] and len(block) >= 3  # inside the fence, shown as code
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(6)&gt;" in page


def test_a_run_folder_name_that_is_not_a_plain_name_gives_no_default_output_path(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path, name="-weird")
    code = cli.main(["compare", str(run), str(finished), "--root", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "run ids '-weird-vs-r1' is not a plain name" in err and not (tmp_path / "reports").exists(), err
    assert cli.main(["report", str(run), "--root", str(tmp_path / "results")]) == 2
    assert "run id '-weird' is not a plain name" in capsys.readouterr().err
    assert cli.main(["report", str(run), "--out", str(tmp_path / "chosen")]) == 0  # an --out the user chose is used as given


def test_status_reads_a_run_folder_without_writing_to_it(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / CELLS_DIR)  # git keeps no empty folder: a run sent in a repository has none
    before = sorted(p.name for p in run.rglob("*"))
    assert cli.main(["status", str(run)]) == 0 and "6 cells" in capsys.readouterr().out
    assert sorted(p.name for p in run.rglob("*")) == before


def test_null_fields_of_run_json_read_as_absent(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    info = json.loads((run / RUN_INFO).read_text())
    write_json(run / RUN_INFO, {**info, "environment": None, "suite": None, "description": None, "cell_keys": None})
    results = run_all(capsys, run, finished, tmp_path / "out")
    assert {name: code for name, (code, _) in results.items()} == {"report": 0, "status": 0, "check": 0, "compare": 0}, results


def test_rows_without_a_variant_label_are_reported_by_their_variant(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)  # found by the fuzzer: AttributeError in the report and compare
    frame = pd.read_parquet(run / PARQUET)
    frame["variant_label"] = None
    frame.to_parquet(run / PARQUET)
    results = run_all(capsys, run, finished, tmp_path / "out")
    assert all(code in (0, 2) for code, _ in results.values()), results
