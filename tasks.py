#!/usr/bin/env python3
"""The project's two commands, from a fresh clone with nothing but Python >= 3.10:

    python3 tasks.py main    # run suites/seq_length.yaml (CPU when there is no GPU) and render its report
    python3 tasks.py test    # run the test suite (extra arguments go to pytest)

Both create (or reuse) the virtual environment `.venv` and install the project into it.
Where torch is already importable (GPU boxes), the venv sees the system site-packages and keeps
that torch; otherwise it installs `torch==2.13.0` (the CPU build pip finds locally) before the
project, so pip never pulls a multi-GB CUDA build onto a CPU-only machine.
Environment: REFORMER_VENV (venv folder), REFORMER_TORCH (torch requirement to install).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("REFORMER_VENV", ROOT / ".venv"))
TORCH_REQUIREMENT = os.environ.get("REFORMER_TORCH", "torch==2.13.0")
EXTRAS = "test,peers,slurm,export"


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _importable(python: Path | str, module: str) -> bool:
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def _pip(*args: str) -> None:
    subprocess.run([str(_venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args], check=True)


def ensure_environment() -> Path:
    """Create/reuse the venv and install the project with its test extras; return its python."""
    python = _venv_python()
    if not python.exists():
        system_torch = _importable(sys.executable, "torch")
        print(f"[tasks] creating {VENV} ({'keeping the system torch' if system_torch else 'fresh'})", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=system_torch).create(VENV)
    stamp = VENV / f".installed-{hashlib.sha256((ROOT / 'pyproject.toml').read_bytes()).hexdigest()[:12]}"
    if stamp.exists():
        return python
    if not _importable(python, "torch"):
        print(f"[tasks] installing {TORCH_REQUIREMENT}", flush=True)
        _pip(TORCH_REQUIREMENT)
    print("[tasks] installing reformer-harness and its dependencies", flush=True)
    _pip("-q", "-e", f"{ROOT}[{EXTRAS}]")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"main", "test", "setup"}:
        print(__doc__)
        return 2
    python = str(ensure_environment())
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "setup":
        return 0
    if command == "test":
        return subprocess.run([python, "-m", "pytest", *rest]).returncode
    suite = rest[0] if rest else "suites/seq_length.yaml"
    run = subprocess.run([python, "-m", "harness", "run", suite, "--report", *rest[1:]])
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
