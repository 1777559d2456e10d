"""The package layout: no import cycle in harness/ or variants/ (imports inside functions count
too), no module importing another module's `_private` name, no module under harness/ over 500
lines, no shared column name spelled outside the row schema (harness/store/schema.py), and the
selfcheck imported only by its command. Read from the source with ast, so a cycle that only shows
at run time on some path is caught as well."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "variants")
MAX_MODULE_LINES = 500  # a module over this is doing two jobs (the developers' guide)
SCHEMA = ROOT / "harness" / "store" / "schema.py"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported(node: ast.AST, known: dict[str, Path], here: str) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for each import of a project module in `node`."""
    out = []
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            out += [(alias.name, []) for alias in item.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0 and item.module.split(".")[0] in PACKAGES:
            for alias in item.names:
                submodule = f"{item.module}.{alias.name}"
                out.append((submodule, []) if submodule in known else (item.module, [alias.name]))
    return [(m, names) for m, names in out if m != here]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the project modules it imports; and the private names imported across modules."""
    known = modules()
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges[name] = set()
        for target, names in imported(tree, known, name):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            edges[name].add(target)
            private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            # A package's __init__ importing its own submodules is how packages are built; the
            # submodule importing a sibling through the package does not make that a cycle.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_checker_finds_a_cycle_and_ignores_a_package_importing_its_submodules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_harness_or_variants():
    edges, _ = graph()
    assert {"harness.cells", "harness.suites", "harness.runner", "harness.isolation"} <= set(edges)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert not private, "\n".join(private)


def test_no_module_under_harness_is_over_500_lines():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "harness").rglob("*.py")}
    long = {path: n for path, n in sorted(lengths.items()) if n > MAX_MODULE_LINES}
    assert len(lengths) > 50 and not long, "\n".join(f"{path}: {n} lines > {MAX_MODULE_LINES}" for path, n in long.items())


NOT_A_COLUMN = "# not a column"  # on a literal's line: the word names something else there (say what)


def column_literals(source: str, columns: frozenset[str]) -> list[tuple[int, str]]:
    """(line, text) of every str constant in `source` that spells a name in `columns`: docstrings (of
    the module, a class or a function) aside, and literals on a line marked NOT_A_COLUMN (a word that
    names something else there: a subcommand, a command-line argument, a key of another document);
    the literal parts of f-strings count."""
    tree = ast.parse(source)
    lines = source.splitlines()
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in columns
        and id(node) not in docstrings
        and NOT_A_COLUMN not in lines[node.lineno - 1]
    )


def test_the_literal_finder_skips_docstrings_and_marked_lines_only():
    source = '''"""status"""
def f(row):
    """time_ms_median"""
    x = "status"  # a comment: time_ms_median
    y = "status"  # not a column: the subcommand
    return row["time_ms_median"], f"{x}seq_len", "other"
'''
    columns = frozenset({"status", "time_ms_median", "seq_len"})
    assert column_literals(source, columns) == [(4, "status"), (6, "seq_len"), (6, "time_ms_median")]


@pytest.mark.skipif(not SCHEMA.exists(), reason="harness/store/schema.py, the row schema (#29), does not exist on this branch yet")
def test_no_shared_column_name_is_spelled_outside_the_schema():
    from harness.store.schema import COLUMNS

    assert {"time_ms_median", "row_type", "seq_len", "status"} <= COLUMNS
    spelled = [
        f"{path.relative_to(ROOT).as_posix()}:{line}: {text!r}"
        for path in sorted((ROOT / "harness").rglob("*.py"))
        if path != SCHEMA
        for line, text in column_literals(path.read_text(encoding="utf-8"), COLUMNS)
    ]
    assert not spelled, (
        f"{len(spelled)} column names spelled outside harness/store/schema.py (use its constants; a word that names "
        f"something else there gets a `{NOT_A_COLUMN}: what it is` comment on its line):\n" + "\n".join(spelled)
    )


def test_only_the_selfcheck_command_imports_the_selfcheck():
    edges, _ = graph()
    importers = {
        module
        for module, targets in edges.items()
        for target in targets
        if target == "harness.selfcheck" or target.startswith("harness.selfcheck.")
    }
    assert "harness.selfcheck.run" in edges
    assert {m for m in importers if not m.startswith("harness.selfcheck")} == {"harness.commands.selfcheck"}
