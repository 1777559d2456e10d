"""Environment capture: code identity, software versions, hardware, host and command."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from harness.measurement import nvml_snapshot
from harness.store.schema import (
    CODE_VERSION,
    DETERMINISTIC_ALGORITHMS,
    DEVICE,
    DEVICE_NAME,
    FLOAT32_MATMUL_PRECISION,
    OPTIONAL_PACKAGES,
    TF32_CUDA_MATMUL,
    TF32_CUDNN,
)
from harness.units import GIB

REPO_ROOT = Path(__file__).resolve().parent.parent  # this package's repository (its code version), never a data root
_GIT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- git


def _git(repo_root: Path, *args: str) -> bytes:
    """Run git in ``repo_root``; raises on failure."""
    # Optional locks off: never contend with a concurrent git command for index.lock.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.run(
        ["git", "-C", str(repo_root), *args],
        check=True,
        capture_output=True,
        timeout=_GIT_TIMEOUT_S,
        env=env,
    ).stdout


def _dirty_hash(repo_root: Path, base: str) -> str | None:
    """8-hex hash of uncommitted changes against ``base``; None when the tree is clean.

    Covers tracked changes (staged or not, ``git diff <base>``) and untracked,
    non-ignored files: their names *and* contents, so editing a new file changes it.
    """
    diff = _git(repo_root, "diff", "--binary", "--no-ext-diff", "--no-textconv", "--no-color", base)
    untracked = [p for p in _git(repo_root, "ls-files", "--others", "--exclude-standard", "-z").split(b"\0") if p]
    if not diff and not untracked:
        return None
    h = hashlib.sha256(diff)
    for rel in sorted(untracked):
        h.update(b"\0untracked\0" + rel + b"\0")
        path = repo_root / os.fsdecode(rel)
        try:
            if path.is_symlink():
                h.update(os.fsencode(os.readlink(path)))
            elif path.is_file():
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()[:8]


def package_version() -> str:
    """`<version> (package)` of the installed reformer-harness distribution, else "unknown": the
    code version of an installation that is not a git checkout."""
    from importlib import metadata

    try:
        return f"{metadata.version('reformer-harness')} (package)"
    except metadata.PackageNotFoundError:
        return "unknown"


def git_state(repo_root: Path | None = None) -> dict:
    """{"git_sha": 40-hex or None, "git_dirty": bool or None, "code_version": str}. Never raises.
    Outside a git checkout (an installed package) the code version is `package_version()`."""
    root = Path(repo_root) if repo_root is not None else REPO_ROOT
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").decode().strip())
    except Exception:
        return {"git_sha": None, "git_dirty": None, CODE_VERSION: package_version()}
    try:
        try:
            sha: str | None = _git(top, "rev-parse", "--verify", "HEAD").decode().strip()
            base = sha
        except subprocess.CalledProcessError:
            # A repository without commits: compare against the empty tree.
            sha = None
            base = _git(top, "hash-object", "-t", "tree", "/dev/null").decode().strip()
        dirty = _dirty_hash(top, base)
    except Exception:
        return {"git_sha": None, "git_dirty": None, CODE_VERSION: "unknown"}
    version = sha[:12] if sha else "nocommit"
    if dirty is not None:
        version += f"+dirty.{dirty}"
    return {"git_sha": sha, "git_dirty": dirty is not None, CODE_VERSION: version}


CODE_VERSION_ENV = "REFORMER_HARNESS_CODE_VERSION"


def code_version(repo_root: Path | None = None) -> str:
    """Short (12-hex) git SHA, plus "+dirty.<8 hex>" when the tree has changes.

    "nocommit[+dirty.<hash>]" in a repository without commits, "<package version> (package)"
    outside git (an installed package, or no git). ``repo_root`` defaults to this package's repository. Never raises.
    A tree copied without its git history (a remote GPU box, a container) can state its version
    in the environment variable ``REFORMER_HARNESS_CODE_VERSION``; it is then marked "(declared)".
    """
    declared = os.environ.get(CODE_VERSION_ENV)
    if declared:
        return f"{declared} (declared)"
    return git_state(repo_root)[CODE_VERSION]


# --------------------------------------------------------------------------- devices


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else platform.processor()/machine()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


# The /proc/cpuinfo flags that decide which vector code runs (compiled kernels, BLAS paths).
SIMD_FLAG_PREFIXES = ("sse4", "avx", "fma", "amx")


def cpu_simd_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vector-extension flags (SIMD_FLAG_PREFIXES: sse4*, avx*, fma, amx*), sorted and
    space-separated, from the first "flags" line of `cpuinfo`; "unknown" where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return " ".join(sorted(flag for flag in value.split() if flag.startswith(SIMD_FLAG_PREFIXES)))
    except (OSError, UnicodeDecodeError):
        pass
    return "unknown"


def device_name(device: str) -> str:
    """Human-readable name of ``device`` ("cuda", "cuda:1", "cpu")."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "unavailable cuda device"
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def device_slug(name: str) -> str:
    """Lowercase, runs of non-alphanumerics -> '-': "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


# --------------------------------------------------------------------------- capture


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


def _host_resources() -> dict:
    try:
        import psutil

        return {
            "cpu_cores_physical": psutil.cpu_count(logical=False),
            "cpu_cores_logical": psutil.cpu_count(logical=True),
            "ram_total_gib": round(psutil.virtual_memory().total / GIB, 2),
        }
    except Exception:
        return {"cpu_cores_physical": None, "cpu_cores_logical": os.cpu_count(), "ram_total_gib": None}


def _variant_backends() -> dict:
    """Machine-dependent code paths of the variants (e.g. whether a compiled CPU kernel loaded)."""
    try:
        from variants.registry import backends

        return backends()
    except Exception as error:  # a description must never stop a run
        return {"error": f"{type(error).__name__}: {error}"}  # not a column: the backends' description


# The optional packages whose versions change numbers (pyproject extras `peers` and `slurm`, plus
# triton): distribution names; the import name is the same with '-' as '_'.
OPTIONAL_PACKAGE_NAMES = (
    "transformers",
    "reformer-pytorch",
    "local-attention",
    "linformer",
    "performer-pytorch",
    "linear-attention-transformer",
    "triton",
    "submitit",
)
FLOAT32_MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision


def optional_package_versions(imported_only: bool = False) -> dict[str, str]:
    """{distribution: version} of the OPTIONAL_PACKAGE_NAMES installed here; with `imported_only`, only
    those this process has imported (what a cell actually used). Reads metadata, imports nothing."""
    from importlib import metadata

    versions = {}
    for name in OPTIONAL_PACKAGE_NAMES:
        if imported_only and name.replace("-", "_") not in sys.modules:
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def numerics_settings() -> dict:
    """The torch settings that change float32 results: matmul precision, TF32 for CUDA matmuls
    and cuDNN convolutions, deterministic algorithms."""
    return {
        FLOAT32_MATMUL_PRECISION: torch.get_float32_matmul_precision(),
        TF32_CUDA_MATMUL: bool(torch.backends.cuda.matmul.allow_tf32),
        TF32_CUDNN: bool(torch.backends.cudnn.allow_tf32),
        DETERMINISTIC_ALGORITHMS: bool(torch.are_deterministic_algorithms_enabled()),
    }


def apply_float32_matmul_precision(precision: str | None) -> dict:
    """Set torch's float32 matmul precision (one of FLOAT32_MATMUL_PRECISIONS; None leaves torch's
    setting) in this process, e.g. a cell's; returns `numerics_settings()` after it."""
    if precision is not None:
        if precision not in FLOAT32_MATMUL_PRECISIONS:
            raise ValueError(f"float32_matmul_precision {precision!r} is not one of {', '.join(FLOAT32_MATMUL_PRECISIONS)}")
        torch.set_float32_matmul_precision(precision)
    return numerics_settings()


def _read_sys(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(256).strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def cpu_frequency_settings(sys_root: str = "/sys/devices/system/cpu") -> dict:
    """{"governor": the cpufreq scaling governors of the CPUs (comma-separated when they differ),
    "boost": "on" / "off" (turbo / boost, from cpufreq/boost or intel_pstate/no_turbo)}; "unknown"
    where /sys does not show them (containers, VMs, other systems)."""
    root = Path(sys_root)
    governors = set()
    try:
        for cpu in sorted(root.glob("cpu[0-9]*"))[:1024]:
            governor = _read_sys(str(cpu / "cpufreq" / "scaling_governor"))
            if governor:
                governors.add(governor)
    except OSError:
        pass
    boost = _read_sys(str(root / "cpufreq" / "boost"))
    no_turbo = _read_sys(str(root / "intel_pstate" / "no_turbo"))
    if boost in ("0", "1"):
        boost_state = "on" if boost == "1" else "off"
    elif no_turbo in ("0", "1"):
        boost_state = "off" if no_turbo == "1" else "on"
    else:
        boost_state = "unknown"
    return {"governor": ",".join(sorted(governors)) or "unknown", "boost": boost_state}


def gpu_clock_lock(device_index: int = 0) -> dict:
    """Whether NVML reports the GPU's clocks locked or pinned: {"clocks_locked": bool,
    "app_clock_sm_mhz", "app_clock_default_sm_mhz"} (application clocks changed from their default,
    or the "applications clocks setting" clock-event reason, which `nvidia-smi -lgc` / `-ac` set);
    {} without NVML or a GPU. Never raises."""
    from harness.measurement import nvml_device

    out: dict = {}
    with nvml_device(device_index) as opened:
        if opened is None:
            return {}
        pynvml, handle = opened
        try:
            out["app_clock_sm_mhz"] = pynvml.nvmlDeviceGetApplicationsClock(handle, pynvml.NVML_CLOCK_SM)
            out["app_clock_default_sm_mhz"] = pynvml.nvmlDeviceGetDefaultApplicationsClock(handle, pynvml.NVML_CLOCK_SM)
        except Exception:
            pass
        reason_bit = getattr(pynvml, "nvmlClocksEventReasonApplicationsClocksSetting", 0x2)
        try:
            getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
            reasons = int(getter(handle))
        except Exception:
            reasons = None
        changed = out.get("app_clock_sm_mhz") is not None and out.get("app_clock_sm_mhz") != out.get("app_clock_default_sm_mhz")
        if reasons is not None or "app_clock_sm_mhz" in out:
            out["clocks_locked"] = bool(changed or (reasons is not None and reasons & reason_bit))
    return out


def capture_environment(device: str) -> dict:
    """JSON-serialisable description of code, software, hardware, host and command.

    GPU fields (driver, NVML clocks/temperature/power) are None/{} without a GPU.
    """
    dev = torch.device(device)
    on_cuda = dev.type == "cuda" and torch.cuda.is_available()
    env: dict = {
        "started_at_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        DEVICE: str(device),
        DEVICE_NAME: device_name(device),
        "gpu_driver": _driver_version() if on_cuda else None,
        "nvml": nvml_snapshot(dev.index or 0) if on_cuda else {},
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd_flags(),
        **_host_resources(),
        "torch_threads": torch.get_num_threads(),
        "variant_backends": _variant_backends(),
        "numerics": numerics_settings(),  # this process's; a suite's measure.float32_matmul_precision applies in its cells (rows)
        OPTIONAL_PACKAGES: optional_package_versions(),  # installed; the rows' `optional_packages`: what each cell imported
        "cpu_frequency": cpu_frequency_settings(),
        "gpu_clocks": gpu_clock_lock(dev.index or 0) if on_cuda else {},
        "command": list(sys.argv),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }
    return env


def format_environment(env: dict) -> str:
    """Aligned "key: value" lines; nested dicts become "parent.child" keys."""
    flat: list[tuple[str, object]] = []
    for key, value in env.items():
        if isinstance(value, dict):
            if not value:
                flat.append((key, "-"))
            flat.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            flat.append((key, " ".join(str(v) for v in value)))
        else:
            flat.append((key, "-" if value is None else value))
    width = max((len(k) for k, _ in flat), default=0)
    return "\n".join(f"{(k + ':').ljust(width + 1)} {v}" for k, v in flat)
