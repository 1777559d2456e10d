"""Baselines: `results/baselines/<device slug>/<name>/`, a copy of a run that later runs are checked against.

    python -m harness baseline RUN --name NAME [--force]

`promote_baseline` copies a finished run folder there atomically (plain files only, checkpoints
checked to be safe to load) and adds baseline.json; `resolve_baseline` finds one by folder or by
name for the device a run was measured on (docs/benchmarks.md).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from harness.check.verdicts import CheckError
from harness.environment import device_slug
from harness.store.files import BASELINES_DIR as STORE_BASELINES_DIR
from harness.store.files import file_mode, to_json
from harness.store.reader import read_run
from harness.store.schema import CODE_VERSION, DEVICE_NAME, RUN_ID

BASELINES_DIR = STORE_BASELINES_DIR  # the name harness.store.files keeps (the run catalog reads it too)
BASELINE_INFO = "baseline.json"


def resolve_baseline(arg: str | Path, device_name: str, root: str | Path = "results", any_device: bool = False) -> Path:
    """The baseline folder for `arg`: an existing path as given, else a baseline name looked up as
    `<root>/baselines/<device slug>/<arg>` (with `any_device`, the only `<root>/baselines/*/<arg>`)."""
    path = Path(arg)
    if path.exists():
        return path
    root = Path(root)
    if len(path.parts) != 1:
        raise CheckError(f"baseline {str(arg)!r} not found: no such file or folder")
    mine = root / BASELINES_DIR / device_slug(device_name) / str(arg)
    if mine.is_dir():
        return mine
    looked = [str(mine)]
    if any_device:
        others = sorted(p for p in (root / BASELINES_DIR).glob(f"*/{arg}") if p.is_dir())
        if len(others) == 1:
            return others[0]
        if len(others) > 1:
            raise CheckError(
                f"baseline {str(arg)!r} exists for several devices: {', '.join(map(str, others))}; "
                "pass the folder of the one to compare with"
            )
        looked.append(str(root / BASELINES_DIR / "*" / str(arg)))
    raise CheckError(
        f"no baseline named {str(arg)!r} for device {device_name!r}: looked for {' and '.join(looked)}. "
        f"Create it from a run with: python -m harness baseline RUN --name {arg}"
    )


def promote_baseline(run_arg: str | Path, name: str, root: str | Path = "results", force: bool = False) -> Path:
    """Copy a run folder to `<root>/baselines/<device slug>/<name>/` (atomically, via a temp folder),
    adding baseline.json (name, source, time). An unfinished run or an existing baseline needs `force`."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise CheckError(f"baseline name {name!r}: use only letters, digits, '_', '.', '-'")
    run = read_run(run_arg, root)
    source = run.path
    if not force and run.info and "finished_at" not in run.info:
        raise CheckError(f"run {source} did not finish (run.json has no finished_at); pass --force to promote it anyway")
    for item in source.rglob("*"):  # a baseline travels on in a repository: only plain files and folders
        if item.is_symlink() or not (item.is_file() or item.is_dir()):
            kind = "a symlink" if item.is_symlink() else "not a regular file or folder"
            raise CheckError(f"{item}: {kind}; a run folder promoted to a baseline holds plain files only")
    from harness.training import CheckpointError, load_checkpoint

    for checkpoint in sorted(source.rglob("*.pt")):  # a gadget must not travel on in a baseline either
        try:
            load_checkpoint(checkpoint)
        except CheckpointError as error:
            raise CheckError(f"{error}; not promoted (remove the file to promote the run without it)") from None
    dest = Path(root) / BASELINES_DIR / device_slug(run.device_name) / name
    if dest.exists() and not force:
        raise CheckError(f"baseline {dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    staging.chmod(file_mode(folder=True))  # mkdtemp's 0700 would make the baseline private
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*.tmp", ".lock", ".*.lock"))
        info = {
            "name": name,
            "promoted_from": str(source),
            RUN_ID: source.name,
            DEVICE_NAME: run.device_name,
            CODE_VERSION: run.code_version,
            "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / BASELINE_INFO).write_text(to_json(info) + "\n", encoding="utf-8")
        if dest.exists():
            old = dest.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
