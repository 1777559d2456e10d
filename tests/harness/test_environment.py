"""Tests for harness.environment: code identity, device names, environment capture."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.environment import (
    capture_environment,
    code_version,
    device_name,
    device_slug,
    format_environment,
    git_state,
)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit holding a.py and a .gitignore for *.log."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("*.log\n")
    _git(tmp_path, "add", "a.py", ".gitignore")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


DIRTY = re.compile(r"^[0-9a-f]{12}\+dirty\.[0-9a-f]{8}$")


@needs_git
def test_clean_repo_is_short_sha(repo: Path) -> None:
    sha = _git(repo, "rev-parse", "HEAD")
    assert code_version(repo) == sha[:12]
    assert git_state(repo) == {"git_sha": sha, "git_dirty": False, "code_version": sha[:12]}
    (repo / "debug.log").write_text("ignored files do not make the tree dirty\n")
    assert code_version(repo) == sha[:12]


@needs_git
def test_dirty_suffix_tracks_the_diff(repo: Path) -> None:
    sha12 = _git(repo, "rev-parse", "HEAD")[:12]
    (repo / "a.py").write_text("x = 2\n")
    first = code_version(repo)
    assert DIRTY.match(first) and first.startswith(sha12 + "+dirty.")
    assert code_version(repo) == first  # deterministic
    (repo / "a.py").write_text("x = 3\n")
    second = code_version(repo)
    assert DIRTY.match(second) and second != first
    _git(repo, "add", "a.py")  # staging does not change what differs from HEAD
    assert code_version(repo) == second
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    assert code_version(repo) == sha12  # back to the committed content


@needs_git
def test_untracked_files_make_it_dirty_by_name_and_content(repo: Path) -> None:
    (repo / "new.py").write_text("y = 1\n")
    first = code_version(repo)
    assert DIRTY.match(first)
    (repo / "new.py").write_text("y = 2\n")
    second = code_version(repo)
    assert DIRTY.match(second) and second != first
    (repo / "new.py").rename(repo / "other.py")
    assert code_version(repo) not in (first, second)


@needs_git
def test_subdirectory_uses_the_whole_repository(repo: Path) -> None:
    (repo / "sub").mkdir()
    assert code_version(repo / "sub") == code_version(repo)
    (repo / "a.py").write_text("x = 5\n")
    assert code_version(repo / "sub") == code_version(repo)


@needs_git
def test_repository_without_commits(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    assert code_version(tmp_path) == "nocommit"
    (tmp_path / "a.py").write_text("x = 1\n")
    assert re.match(r"^nocommit\+dirty\.[0-9a-f]{8}$", code_version(tmp_path))


def test_outside_git_is_the_package_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    installed = f"{metadata.version('reformer-harness')} (package)"  # pyproject.toml's version, as installed
    assert code_version(tmp_path / "does-not-exist") == installed
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repo above tmp_path
    assert code_version(tmp_path) == installed
    assert git_state(tmp_path) == {"git_sha": None, "git_dirty": None, "code_version": installed}
    monkeypatch.setattr(metadata, "version", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name)))
    assert code_version(tmp_path) == "unknown"  # neither git nor an installed distribution
    monkeypatch.setenv("PATH", "")  # no git at all
    assert code_version(tmp_path) == "unknown"


def test_default_repo_root_gives_a_version() -> None:
    version = code_version()
    assert version == "unknown" or re.match(r"^([0-9a-f]{12}|nocommit)(\+dirty\.[0-9a-f]{8})?$", version)


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb"),
        ("Intel(R) Xeon(R) Platinum 8480+", "intel-r-xeon-r-platinum-8480"),
        ("  AMD EPYC  7763 64-Core Processor ", "amd-epyc-7763-64-core-processor"),
        ("!!!", "unknown"),
    ],
)
def test_device_slug(name: str, slug: str) -> None:
    assert device_slug(name) == slug


def test_device_name_cpu() -> None:
    name = device_name("cpu")
    assert isinstance(name, str) and name.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_name_cuda() -> None:
    assert device_name("cuda") == torch.cuda.get_device_name(0)
    assert device_name("cuda:0") == torch.cuda.get_device_name(0)


EXPECTED_KEYS = {
    "started_at_utc",
    "git_sha",
    "git_dirty",
    "code_version",
    "python",
    "torch",
    "torch_cuda",
    "cudnn",
    "device",
    "device_name",
    "gpu_driver",
    "nvml",
    "cpu_model",
    "cpu_cores_physical",
    "cpu_cores_logical",
    "ram_total_gib",
    "torch_threads",
    "command",
    "hostname",
    "platform",
}


def test_capture_environment_cpu() -> None:
    env = capture_environment("cpu")
    assert EXPECTED_KEYS <= set(env)
    assert json.loads(json.dumps(env)) == env
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_cores_logical"] >= 1 and env["ram_total_gib"] > 0
    assert env["device"] == "cpu" and env["nvml"] == {} and env["gpu_driver"] is None
    assert env["started_at_utc"].endswith("+00:00")
    assert isinstance(env["command"], list)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_environment_cuda() -> None:
    env = capture_environment("cuda")
    json.dumps(env)
    assert env["device_name"] == torch.cuda.get_device_name(0)
    assert env["torch_cuda"] == torch.version.cuda
    if env["gpu_driver"] is not None:  # NVML usable
        assert env["nvml"].get("sm_clock_mhz", 0) > 0


def test_format_environment_lists_every_field() -> None:
    env = {"torch": "2.13", "nvml": {"sm_clock_mhz": 1980}, "command": ["a", "--b"], "cudnn": None}
    text = format_environment(env)
    lines = text.splitlines()
    assert len(lines) == 4
    assert re.match(r"^torch:\s+2\.13$", lines[0])
    assert re.match(r"^nvml\.sm_clock_mhz:\s+1980$", lines[1])
    assert re.match(r"^command:\s+a --b$", lines[2])
    assert re.match(r"^cudnn:\s+-$", lines[3])
    assert "code_version" in format_environment(capture_environment("cpu"))


def test_code_version_can_be_declared_for_a_tree_without_history(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REFORMER_HARNESS_CODE_VERSION", "0123456789ab")
    assert code_version(tmp_path) == "0123456789ab (declared)"


# --------------------------------------------------------------------------- settings that change numbers


def test_numerics_settings_follow_torch() -> None:
    from harness.environment import apply_float32_matmul_precision, numerics_settings

    before = torch.get_float32_matmul_precision()
    try:
        settings = apply_float32_matmul_precision("medium")
        assert settings["float32_matmul_precision"] == "medium"
        assert settings["tf32_cuda_matmul"] is True  # torch ties TF32 matmuls to a precision below "highest"
        assert apply_float32_matmul_precision(None)["float32_matmul_precision"] == "medium"  # None leaves it
        with pytest.raises(ValueError, match="highest, high, medium"):
            apply_float32_matmul_precision("low")
    finally:
        torch.set_float32_matmul_precision(before)
    assert numerics_settings() == {
        "float32_matmul_precision": before,
        "tf32_cuda_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _sysfs(root: Path, governors: list[str], boost: str | None = None, no_turbo: str | None = None) -> Path:
    for i, governor in enumerate(governors):
        (root / f"cpu{i}" / "cpufreq").mkdir(parents=True)
        (root / f"cpu{i}" / "cpufreq" / "scaling_governor").write_text(governor + "\n")
    if boost is not None:
        (root / "cpufreq").mkdir(exist_ok=True)
        (root / "cpufreq" / "boost").write_text(boost + "\n")
    if no_turbo is not None:
        (root / "intel_pstate").mkdir()
        (root / "intel_pstate" / "no_turbo").write_text(no_turbo + "\n")
    return root


def test_cpu_frequency_settings_read_sysfs_and_say_unknown_without_it(tmp_path: Path) -> None:
    from harness.environment import cpu_frequency_settings

    assert cpu_frequency_settings(str(_sysfs(tmp_path / "a", ["performance", "performance"], boost="0"))) == {
        "governor": "performance",
        "boost": "off",
    }
    assert cpu_frequency_settings(str(_sysfs(tmp_path / "b", ["powersave", "performance"], no_turbo="0"))) == {
        "governor": "performance,powersave",
        "boost": "on",
    }
    assert cpu_frequency_settings(str(tmp_path / "none")) == {"governor": "unknown", "boost": "unknown"}


def test_cpu_simd_flags_keep_the_vector_extensions(tmp_path: Path) -> None:
    from harness.environment import cpu_simd_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 sse4_2 avx2 fma avx512f avx512bw amx_tile pdpe1gb\n\nprocessor\t: 1\nflags\t\t: avx\n"
    )
    assert cpu_simd_flags(str(cpuinfo)) == "amx_tile avx2 avx512bw avx512f fma sse4_2"
    assert cpu_simd_flags(str(tmp_path / "missing")) == "unknown"
    assert isinstance(capture_environment("cpu")["cpu_simd"], str)


def test_gpu_clock_lock_without_nvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from harness.environment import gpu_clock_lock

    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert gpu_clock_lock(0) == {}


def test_optional_packages_cover_the_optional_extras() -> None:
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from harness.environment import OPTIONAL_PACKAGE_NAMES, optional_package_versions

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {re.split(r"[<>=\[ ]", spec)[0] for extra in ("peers", "slurm") for spec in extras[extra]}
    assert named <= set(OPTIONAL_PACKAGE_NAMES) and "triton" in OPTIONAL_PACKAGE_NAMES
    installed = optional_package_versions()
    for name, version in installed.items():
        assert version == metadata.version(name)
    imported = optional_package_versions(imported_only=True)
    assert all(name.replace("-", "_") in sys.modules for name in imported)


def test_capture_environment_records_the_settings_that_change_numbers() -> None:
    env = capture_environment("cpu")
    assert env["numerics"]["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert set(env["cpu_frequency"]) == {"governor", "boost"}
    assert env["gpu_clocks"] == {} and isinstance(env["optional_packages"], dict)
