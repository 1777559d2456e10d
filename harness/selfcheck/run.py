"""The fixed list of checks (`plan_checks`), choosing among them (`select_checks`), and running them
(`run_selfcheck`: one line per check, selfcheck.json rewritten after each)."""

from __future__ import annotations

import fnmatch
import os
import tempfile
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

import torch

import variants
from harness.environment import REPO_ROOT, capture_environment, code_version, device_name
from harness.selfcheck.framework import Check, CheckResult, Context, Outcome, SelfcheckError, Skip, Summary, first_line
from harness.selfcheck.lsh_checks import LONG_LSH, LSH_ROUNDS, LSH_TRITON_ROUNDS, LshCase, check_lsh, check_reversible_lsh
from harness.selfcheck.measurement_checks import check_device, check_gpu_timers, check_nvml, check_peak_memory, check_timer
from harness.selfcheck.references import CHECKED_DTYPES
from harness.selfcheck.runner_checks import check_oom, check_pool, check_suite
from harness.selfcheck.variant_checks import check_variant
from harness.suites.common import resolve_device

SUMMARY_FILE = "selfcheck.json"


def causal_word(causal: bool) -> str:
    """How a check's name says the masking: "causal" or "bidirectional"."""
    return "causal" if causal else "bidirectional"  # not a column: words of check names


def plan_checks(quick: bool = False) -> list[Check]:
    """The fixed list of checks, in the order they run. --quick leaves out the long and special LSH cases
    and repeats less; the variant list is whatever the registry holds (plugins included)."""
    try:
        names = variants.available()
    except ImportError as error:  # a plugin named in REFORMER_HARNESS_PLUGINS that does not import
        raise SelfcheckError(str(error)) from None
    checks = [
        Check("device", check_device),  # not a column: check names
        Check("timer", check_timer),  # not a column: check names
        Check("gpu_timers", check_gpu_timers),
        Check("peak_memory", check_peak_memory),
        Check("nvml", check_nvml),
    ]
    checks += [Check(f"variant/{name}/{dtype}", partial(check_variant, name, dtype)) for name in names for dtype in CHECKED_DTYPES]
    for dtype in CHECKED_DTYPES:
        for n_hashes in LSH_ROUNDS:
            for causal in (False, True):
                case = LshCase(n_hashes, causal)
                checks.append(Check(f"lsh/rounds={n_hashes}/{causal_word(causal)}/{dtype}", partial(check_lsh, case, dtype)))
        for n_hashes in LSH_TRITON_ROUNDS:
            for causal in (False, True):
                case = LshCase(n_hashes, causal, backend="triton")
                checks.append(Check(f"lsh_triton/rounds={n_hashes}/{causal_word(causal)}/{dtype}", partial(check_lsh, case, dtype)))
    if not quick:
        for causal in (False, True):
            case = LshCase(8, causal, **LONG_LSH)
            checks.append(Check(f"lsh/long/rounds=8/{causal_word(causal)}/float32", partial(check_lsh, case, "float32")))
        for dtype in CHECKED_DTYPES:
            recompute = LshCase(4, True, save_probs=False, backend="ops")  # the ops path's recomputing backward
            checks.append(Check(f"lsh/recompute/rounds=4/causal/{dtype}", partial(check_lsh, recompute, dtype)))
        checks.append(
            Check(
                "lsh/dup_correction/rounds=4/bidirectional/float32", partial(check_lsh, LshCase(4, False, dup_correction=True), "float32")
            )
        )
        checks.append(Check("lsh/reversible/rounds=8/causal/float32", partial(check_reversible_lsh, "float32")))
    checks += [Check("oom", check_oom), Check("pool", check_pool), Check("suite", check_suite)]  # not a column: check names
    return checks


def select_checks(checks: list[Check], only: list[str] | None) -> list[Check]:
    """The checks whose name matches one of the glob patterns `only` (all of them without patterns)."""
    if not only:
        return checks
    selected = [c for c in checks if any(fnmatch.fnmatchcase(c.name, pattern) for pattern in only)]
    if not selected:
        raise SelfcheckError(
            f"--only {' '.join(only)}: no check matches; checks are named like "
            f"{', '.join(c.name for c in checks[:6])}, ... (--list shows all)"
        )
    return selected


def selfcheck_device(device: str) -> torch.device:
    """The device under test: `auto` -> cuda when available, else cpu (harness.suites.common.resolve_device);
    SelfcheckError for a name that is no device and for a CUDA device this machine does not have."""
    device = resolve_device(device)
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SelfcheckError(f"--device {device}: not a device (cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SelfcheckError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device cpu"
            )
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise SelfcheckError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif resolved.type != "cpu":
        raise SelfcheckError(f"--device {device}: only cpu and cuda are supported")
    return resolved


def run_one_check(check: Check, context: Context) -> CheckResult:
    """Run one check; Skip becomes SKIP, any other exception a FAIL with its type and message."""
    start = time.perf_counter()
    try:
        outcome = check.run(context)
    except Skip as skip:
        outcome = Outcome("SKIP", str(skip))
    except Exception as error:  # noqa: BLE001 - a broken path is what the selfcheck reports
        outcome = Outcome(
            "FAIL", f"{type(error).__name__}: {first_line(error)}", {"traceback": "".join(traceback.format_exception(error))[-4000:]}
        )
    finally:
        if context.device.type == "cuda":
            torch.cuda.synchronize(context.device)
            torch.cuda.empty_cache()
    return CheckResult(check.name, outcome.status, " ".join(outcome.detail.split()), time.perf_counter() - start, outcome.data)


def run_selfcheck(
    device: str = "auto",
    quick: bool = False,
    only: list[str] | None = None,
    out: Path | str | None = None,
    print_line: Callable[[str], None] = print,
) -> Summary:
    """Run the selected checks on `device` (auto | cpu | cuda[:N]), printing one line per check as it ends
    and a final count. With `out`, `out/selfcheck.json` (results, seconds, environment) is rewritten after
    every check, so a run cut short still leaves what it found. SelfcheckError for unusable input, before
    anything runs."""
    resolved = selfcheck_device(device)
    checks = select_checks(plan_checks(quick), only)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        try:
            out_path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SelfcheckError(f"--out {out_path}: cannot create it ({error.strerror or error})") from None
    width = max(len(c.name) for c in checks)
    print_line(f"selfcheck on {resolved} ({device_name(str(resolved))}), {'quick' if quick else 'full'}: {len(checks)} checks")
    start = time.perf_counter()
    summary = Summary(
        str(resolved),
        quick,
        [c.name for c in checks],
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version(REPO_ROOT),
        capture_environment(str(resolved)),
    )
    with tempfile.TemporaryDirectory(prefix="harness-selfcheck-") as workdir:
        context = Context(resolved, quick, Path(workdir))
        for check in checks:
            summary.results.append(run_one_check(check, context))
            summary.wall_s = time.perf_counter() - start
            if out_path is not None:
                summary.path = write_summary(summary, out_path)
            print_line(summary.results[-1].line(width))
    summary.finished = True
    if out_path is not None:
        write_summary(summary, out_path)
    counts = summary.counts
    print_line(
        f"selfcheck {'FAILED' if counts['FAIL'] else 'passed'}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
        f"{counts['SKIP']} SKIP in {summary.wall_s:.1f} s" + (f" -> {summary.path}" if summary.path else "")
    )
    return summary


def write_summary(summary: Summary, out: Path) -> Path:
    """Write `out/selfcheck.json` atomically (`Summary.as_dict`); return its path."""
    from harness.store.files import atomic_write_json

    path = out / SUMMARY_FILE
    atomic_write_json(path, summary.as_dict())
    return path
