"""Suites: YAML files that expand into cells. One loader for every kind.

    suite = load_suite("suites/seq_length.yaml", device="cpu")   # or a `kind: quality` suite
    suite.kind, suite.name, suite.device, suite.cells()

`kind: benchmark` (the default) is harness.suites.benchmark: timing and memory of a workload;
`kind: quality` (or a file with a `train:` block) is harness.suites.quality: training runs with
learning curves and evaluations. Both read the file once with harness.suites.common (line numbers,
bounded YAML), and every problem is a `SuiteError` naming the file, line, key path and what is
allowed; nothing is run or written before a suite has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.overrides import Override, OverrideError, apply_overrides
from harness.store.schema import DEVICE, KIND_QUALITY
from harness.suites.benchmark import BenchmarkSuite, load_benchmark_suite
from harness.suites.common import Locator, SuiteError, filter_cells, parse_suite_yaml, suite_kind
from harness.suites.quality import QualitySuite, load_quality_suite

Suite = BenchmarkSuite | QualitySuite

__all__ = ["BenchmarkSuite", "QualitySuite", "Suite", "SuiteError", "filter_cells", "load_suite"]


def load_suite(path: str | Path, device: str | None = None, overrides: Sequence[Override] = ()) -> Suite:
    """Read, validate and expand a suite file of either kind; `device` (auto|cpu|cuda) overrides
    the file's, `overrides` (--set, harness.overrides) its keys: those of `cpu.*`, `cuda.*`,
    `device` and `kind` before the `cpu:` / `cuda:` block is merged, all others after it (a --set
    wins over the block). `suite.resolved_config` is the data the validator saw. Raises SuiteError
    (never anything else) for any problem with the file or an override."""
    path = Path(path)
    data, lines = parse_suite_yaml(path)
    locator = Locator(path, lines)
    locator.overrides = list(overrides)
    try:
        apply_overrides(data, [o for o in overrides if o.early])
    except OverrideError as error:
        raise SuiteError(str(error), path) from None
    if suite_kind(data, locator) == KIND_QUALITY:
        suite: Suite = load_quality_suite(path, data, locator, device)
    else:
        suite = load_benchmark_suite(path, data, locator, device)
    suite.resolved_config = {**locator.merged, DEVICE: suite.device}
    return suite
