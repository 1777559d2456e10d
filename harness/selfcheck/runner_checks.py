"""`oom`, `pool`, `suite`: the cell runner's machinery on small one-variant suites: an out-of-memory
cell comes back as an `oom` row, the pool executor runs cells in its slots, and a suite runs end to
end (`python -m harness run`) and renders its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import variants
from harness.environment import REPO_ROOT
from harness.selfcheck.framework import Context, Outcome, Skip, first_line
from harness.store.schema import D_MODEL, DEVICE_NAME, MEMORY_LIMIT_MIB, MESSAGE, STATUS, STATUS_OK, STATUS_OOM, THREADS

# The self-check's cells check code paths, not timings: a contended one is not re-measured.
FAST_MEASURE = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "max_time_s": 5.0, "timeout_s": 300.0, "contention_retries": 0}
SMALL_MODEL = dict(d_model=32, n_heads=2)  # the suites' `model:` block


def probe_attention_variant() -> str:
    """A registered attention variant to drive the runner checks: the first one defined in the `variants`
    package (else any) that builds and runs a small forward and backward on the CPU (the suites'
    mode; flex, say, has no CPU backward)."""
    names = variants.available("attention")
    built_in = [n for n in names if variants.spec(n).module_cls.__module__.startswith("variants.")]
    for name in built_in + [n for n in names if n not in built_in]:
        try:
            x = torch.randn(1, 64, SMALL_MODEL[D_MODEL], requires_grad=True)
            variants.build(name, **SMALL_MODEL)(x).sum().backward()
            return name
        except Exception:  # noqa: BLE001 - unavailable or broken here: try the next one
            continue
    raise Skip("no registered attention variant runs a small forward and backward on the CPU")


def write_suite(
    folder: Path, name: str, device: torch.device, sweep: dict, model: dict | None = None, mode: str = "forward", **measure_settings: Any
) -> Path:
    """A one-variant attention suite file `folder/name.yaml` for `device` (fast measure settings)."""
    suite = dict(  # the suite file's keys
        name=name,
        device=device.type,
        mode=mode,
        workload="attention",
        model=model or SMALL_MODEL,
        sweep=sweep,
        variants=[{"name": probe_attention_variant()}],
        measure={**FAST_MEASURE, **measure_settings},
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def check_oom(context: Context) -> Outcome:
    """A cell whose inputs (4 GiB) exceed its 0.25 GiB memory limit comes back from its own process as an
    `oom` row, not a crash: on CPU the allocation passes the address-space backstop (RLIMIT_AS) of the
    limit, on CUDA the caching allocator's per-process memory fraction."""
    from harness.runner import execute_isolated
    from harness.suites import load_suite

    path = write_suite(
        context.workdir / "oom",
        "selfcheck_oom",
        context.device,
        dict(seq_len=[2**20], batch=[1]),
        model=dict(d_model=1024, n_heads=4),
        memory_limit_gib=0.25,
        timeout_s=120.0,
    )
    row = execute_isolated(load_suite(path).cells()[0], str(context.workdir / "oom"), "oom", "selfcheck")
    message = re.sub(r"\[enforce fail at [^\]]*\] (err == 0\. )?", "", " ".join(str(row.get(MESSAGE) or "").split()))
    limit = f"limit {row[MEMORY_LIMIT_MIB] / 1024:.3g} GiB" if row.get(MEMORY_LIMIT_MIB) else "no memory limit set"
    detail = f"{row[STATUS]} row ({limit}, 4 GiB of inputs): {message[:140]}"
    ok = row[STATUS] == STATUS_OOM and "memory limit" in message
    return Outcome(
        "PASS" if ok else "FAIL",
        detail + ("" if ok else "; expected an oom row naming the memory limit"),
        {"row": {k: row.get(k) for k in (STATUS, MESSAGE, MEMORY_LIMIT_MIB)}},
    )


def visible_gpus() -> list[str]:
    """The GPU ids the pool executor should pin, one slot each: CUDA_VISIBLE_DEVICES' entries, else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def check_pool(context: Context) -> Outcome:
    """The pool executor runs two cells (two groups) in worker slots: on CPU two slots, each cell with the
    slot's thread share; on CUDA one slot per visible GPU (CUDA_VISIBLE_DEVICES honoured), each cell on
    the GPU its slot pins."""
    from harness.executors import pool_slots, run_pool
    from harness.isolation import THREADS_ENV
    from harness.runner import RunOptions
    from harness.store.writer import RunStore
    from harness.suites import load_suite

    on_cuda = context.device.type == "cuda"
    slots = pool_slots(context.device.type, None if on_cuda else 2)
    cells = load_suite(write_suite(context.workdir / "pool", "selfcheck_pool", context.device, dict(seq_len=[64], batch=[1, 2]))).cells()
    store = RunStore(context.workdir / "pool" / "results", "selfcheck_pool", "pool")
    lines: list[str] = []
    rows = run_pool(cells, store, RunOptions(code_version="selfcheck", run_id="pool", print_line=lines.append), slots)
    statuses = [row[STATUS] for row in rows]
    problems = (
        []
        if statuses == [STATUS_OK, STATUS_OK]
        else [
            f"statuses {statuses}: " + "; ".join(first_line(Exception(row.get(MESSAGE) or "")) for row in rows if row[STATUS] != STATUS_OK)
        ]
    )
    if on_cuda:
        pinned = [slot.get("CUDA_VISIBLE_DEVICES") for slot in slots]
        if pinned != visible_gpus():
            problems.append(f"slots pin {pinned}, visible GPUs are {visible_gpus()}")
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        problems += [f"a cell ran on {row.get(DEVICE_NAME)!r}" for row in rows if row.get(DEVICE_NAME) not in names]
        detail = f"{statuses.count('ok')}/2 cells ok on {len(slots)} slot(s) pinned to CUDA_VISIBLE_DEVICES={','.join(pinned)}"
    else:
        threads = [int(slot[THREADS_ENV]) for slot in slots]
        problems += [
            f"a cell ran with {row.get(THREADS)} threads, its slot gives {threads[0]}"
            for row in rows
            if row.get(STATUS) == STATUS_OK and row.get(THREADS) != threads[0]
        ]
        if len(slots) != 2:
            problems.append(f"{len(slots)} slots for --workers 2")
        detail = f"{statuses.count('ok')}/2 cells ok on {len(slots)} slots of {threads[0]} thread(s)"
    data = {"slots": slots, "rows": [{k: row.get(k) for k in (STATUS, THREADS, DEVICE_NAME)} for row in rows]}
    return Outcome("FAIL" if problems else "PASS", detail + ("; " + "; ".join(problems) if problems else ""), data)


def check_suite(context: Context) -> Outcome:
    """A two-cell suite run end to end (`python -m harness run` in its own process, each cell in its own)
    into a temporary folder, then its report (report.md, index.html, figures)."""
    from harness.report import render_report
    from harness.store.reader import load

    folder = context.workdir / "suite"  # not a column: the check's scratch folder
    path = write_suite(folder, "selfcheck_suite", context.device, dict(seq_len=[64, 128], batch=[1]), mode="forward_backward")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "harness", "run", str(path), "--out", str(folder / "results")]
    completed = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        tail = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-1:] or [""]
        return Outcome(
            "FAIL",
            f"harness run exited {completed.returncode}: {tail[0][:200]}",
            {"stdout": completed.stdout[-4000:], "stderr": completed.stderr[-4000:]},
        )
    runs = sorted((folder / "results" / "selfcheck_suite").iterdir())
    rows = load(runs[-1])
    report = render_report([runs[-1]], out=folder / "report")
    figures = sorted(p.name for p in report.glob("*.png"))
    documents = [name for name in ("report.md", "index.html") if (report / name).is_file()]
    statuses = rows[STATUS].tolist()
    detail = f"{statuses.count('ok')}/2 cells ok, report with {', '.join(documents) or 'no documents'} and {len(figures)} figures"
    ok = statuses == [STATUS_OK, STATUS_OK] and len(documents) == 2 and figures
    return Outcome("PASS" if ok else "FAIL", detail, {"statuses": statuses, "figures": figures})
