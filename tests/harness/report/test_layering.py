"""The report, analysis and check packages keep their layers: the report never imports the check layer,
and analysis only the `checks:` schema (harness.check.rules, which the suites read too). Read with ast.
(That no module spells a result column as a string is tests/test_layout.py's.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


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
