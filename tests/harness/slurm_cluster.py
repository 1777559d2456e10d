"""The single-node Slurm cluster of scripts/slurm_local.py as a pytest fixture.

`slurm_cluster` (module scope) brings the cluster up in a temporary folder when munged, slurmctld
and slurmd are installed and this runs as root, waits for the node, points SLURM_CONF at it for
the tests (and the processes they start), and at the end cancels its jobs and stops its daemons
by PID. Where it cannot start, the tests that use it are skipped with the reason.
The bring-up itself lives in scripts/slurm_local.py only (users run the same code).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm_local.py"


def load_slurm_local() -> ModuleType:
    """scripts/slurm_local.py as a module (scripts/ is not a package)."""
    if "slurm_local" in sys.modules:
        return sys.modules["slurm_local"]
    spec = importlib.util.spec_from_file_location("slurm_local", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["slurm_local"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


slurm_local = load_slurm_local()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A running single-node cluster (slurm_local.Cluster) with SLURM_CONF set to it; skips where
    it cannot start."""
    reason = slurm_local.unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        cluster = slurm_local.start(tmp_path_factory.mktemp("slurm"))
    except slurm_local.ClusterUnavailable as error:
        pytest.skip(f"the single-node Slurm cluster did not start: {error}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        slurm_local.stop(cluster)
