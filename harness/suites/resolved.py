"""A suite with its `--set` overrides (harness.overrides), as `harness run` and `profile` use it:
the resolved configuration as YAML (`--print-config`), the cells an override changes (`--dry-run`),
and the check that a resumed run keeps its cells.

    suite, overrides = load_with_overrides("suites/smoke.yaml", ["model.d_model=128"], device="cpu")
    print(config_yaml(suite, overrides))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from harness.overrides import Override, OverrideError, parse_overrides
from harness.suites import Suite, SuiteError, load_suite


def load_with_overrides(path: str | Path, arguments: Sequence[str] | None, device: str | None = None) -> tuple[Suite, list[Override]]:
    """(the suite with the `--set` arguments applied, the parsed overrides); SuiteError naming the
    argument for an unusable one."""
    try:
        overrides = parse_overrides(list(arguments or []))
    except OverrideError as error:
        raise SuiteError(str(error), path) from None
    return load_suite(path, device=device, overrides=overrides), overrides


def config_yaml(suite: Suite, overrides: Sequence[Override]) -> str:
    """The resolved suite (its `cpu:` / `cuda:` block merged, the overrides applied, the device
    resolved) as a YAML document, headed by a comment naming the file and the overrides."""
    header = [f"# {suite.path} resolved for device {suite.device}"]
    header += [f"# --set {o.text}" for o in overrides]
    body = yaml.safe_dump(suite.resolved_config, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)
    return "\n".join(header) + "\n" + body


def cell_identities(cells: Sequence[Any]) -> list[str]:
    """Each cell's configuration identity, independent of the code version (its key with "")."""
    return [c.key("") for c in cells]


def changed_cells(path: str | Path, device: str | None, cells: Sequence[Any]) -> list[bool]:
    """For each of `cells` (of the suite with overrides): True when the suite file without
    overrides has no cell of the same configuration (the override changed or added it)."""
    base = set(cell_identities(load_suite(path, device=device).cells()))
    return [key not in base for key in cell_identities(cells)]


def recorded_overrides(info: dict[str, Any]) -> list[str]:
    """The `--set` arguments a run was started with (run.json `overrides`), as typed."""
    records = info.get("overrides") or []
    if not isinstance(records, list):
        return []
    return [str(r["set"]) for r in records if isinstance(r, dict) and isinstance(r.get("set"), str)]


def resume_problem(path: str | Path, device: str | None, info: dict[str, Any], suite: Suite, overrides: Sequence[Override]) -> str | None:
    """Why `--resume` of the run described by `info` (its run.json) must be refused with these
    overrides, or None: the cells of the suite with the run's own `--set` arguments must equal the
    cells with this command's (a resume measures the cells the run planned, no others)."""
    started = recorded_overrides(info)
    if started == [o.text for o in overrides]:
        return None
    try:
        before, _ = load_with_overrides(path, started, device=device)
    except SuiteError as error:
        return f"the run's own --set arguments no longer apply to {path}: {error}"
    if sorted(cell_identities(before.cells())) == sorted(cell_identities(suite.cells())):
        return None
    was = " ".join(f"--set {t}" for t in started) or "no --set"
    now = " ".join(f"--set {o.text}" for o in overrides) or "no --set"
    return f"the run was started with {was}; this command's {now} changes its cells (resume it with the same --set arguments)"
