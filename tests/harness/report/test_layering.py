"""The report, analysis and check packages keep their layers: the report never imports the check layer,
analysis only the `checks:` schema (harness.check.rules, which the suites read too), and none of
them spells a result column as a string (harness.store.schema names them). Read with ast."""

from __future__ import annotations

import ast
from pathlib import Path

from harness.store import schema

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("report", "analysis", "check")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / "harness" / package).glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out


def test_the_report_never_imports_the_check_layer_and_analysis_only_its_schema():
    for path in modules("report"):
        assert not {m for m in imported_modules(path) if m.startswith("harness.check")}, path.name
    for path in modules("analysis"):
        checks = {m for m in imported_modules(path) if m.startswith("harness.check")}
        assert {m.rsplit(".", 1)[0] if m.count(".") > 2 else m for m in checks} <= {"harness.check.rules"}, path.name


def column_literals(path: Path) -> list[str]:
    """ "line: 'name'" of every string literal that spells a schema column (docstrings aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        f"{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in schema.COLUMNS and id(node) not in docstrings
    ]


def test_no_column_name_is_spelled_as_a_string(tmp_path):
    found = {f"{package}/{path.name}": column_literals(path) for package in PACKAGES for path in modules(package)}
    assert not {name: lines for name, lines in found.items() if lines}
    probe = tmp_path / "probe.py"  # the checker finds a literal, and leaves docstrings alone
    probe.write_text('"""Reads `seq_len`."""\n\n\ndef f(row):\n    """seq_len"""\n    return row["seq_len"], "sequence"\n')
    assert column_literals(probe) == ["6: 'seq_len'"]
