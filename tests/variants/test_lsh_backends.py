"""Backend selection of LSH attention (variants/attention/lsh_backends.py), with or without triton."""

import pytest
import torch

import variants
from harness.store.schema import ATTENTION_BACKEND as ATTENTION_BACKEND_COLUMN
from harness.workloads import Workload
from variants.attention import lsh_cpu, lsh_triton
from variants.attention.lsh import lsh_attention
from variants.attention.lsh_backends import resolve_backend
from variants.registry import VariantUnavailable

CPU = torch.device("cpu")


def resolve(backend, dtype=torch.float32, device=CPU, **kwargs):
    return resolve_backend(backend, device, dtype, head_dim=32, bucket_size=32, **kwargs)


def test_auto_ops_and_errors(monkeypatch):
    expected = "cpu_kernel" if lsh_cpu.available(CPU, torch.float32) else "ops"
    assert resolve("auto") == expected
    assert resolve("auto", torch.float64) == "ops"
    assert resolve("ops") == "ops"
    with pytest.raises(ValueError, match="backend must be one of auto, ops, cpu_kernel, triton"):
        resolve("cuda")
    with pytest.raises(VariantUnavailable, match="cpu_kernel"):
        resolve("cpu_kernel", torch.float64)
    monkeypatch.setattr(lsh_triton, "installed_version", lambda: None)
    with pytest.raises(VariantUnavailable, match="needs the triton package"):
        resolve("triton")
    assert resolve("auto", torch.bfloat16, torch.device("meta")) == "ops"


def test_auto_on_cuda_is_triton_where_installed(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(lsh_triton, "installed_version", lambda: "3.9.0")
    assert resolve("auto", torch.bfloat16, cuda) == "triton"
    assert resolve("auto", torch.bfloat16, cuda, dup_correction=True) == "triton (dup_correction: ops core)"
    assert resolve_backend("auto", cuda, torch.float16, head_dim=24, bucket_size=64) == "ops"  # shape it cannot tile
    monkeypatch.setattr(lsh_triton, "installed_version", lambda: None)
    assert resolve("auto", torch.bfloat16, cuda) == "ops"


def test_a_triton_that_does_not_import_is_not_used(monkeypatch):
    """Installed but broken (e.g. built for another torch): auto takes the ops path, 'triton' says why."""
    import sys

    cuda = torch.device("cuda")
    monkeypatch.setattr(lsh_triton, "installed_version", lambda: "3.9.0")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert resolve("auto", torch.bfloat16, cuda) == "ops"
    with pytest.raises(VariantUnavailable, match="installed but does not import"):
        resolve("triton", torch.bfloat16, cuda)


def test_ops_backend_keeps_float32_cpu_off_the_kernel(monkeypatch):
    calls = []
    for name in ("forward", "backward", "hash_buckets", "sort_items"):
        original = getattr(lsh_cpu, name)
        monkeypatch.setattr(lsh_cpu, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    qk, v = torch.randn(2, 1, 2, 64, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    qk.requires_grad_()
    out = {b: lsh_attention(qk, v, n_hashes=2, bucket_size=16, seed=1, backend=b) for b in ("ops", "auto")}
    out["ops"].sum().backward()
    assert calls == ([] if not lsh_cpu.available(CPU, torch.float32) else ["hash_buckets", "sort_items", "forward"])
    torch.testing.assert_close(out["ops"], out["auto"], rtol=1e-5, atol=1e-6)


def test_rows_record_the_backend_the_module_ran():
    module = variants.build("lsh", d_model=16, n_heads=2, bucket_size=16, backend="ops")
    module(torch.randn(1, 32, 16))
    assert Workload(step=lambda: None, module=module, tokens=32, flops=0).attention_backends() == {ATTENTION_BACKEND_COLUMN: "ops"}
    module(torch.randn(1, 8, 16))  # shorter than a bucket: full attention
    assert module.attention_backend.startswith("full attention")
    assert Workload(step=lambda: None, module=variants.build("full", d_model=16), tokens=1, flops=0).attention_backends() == {}
    with pytest.raises(ValueError, match="backend must be one of"):
        variants.build("lsh", d_model=16, backend="gpu")


def test_benchmark_rows_carry_the_asked_and_the_used_backend(tmp_path):
    from harness.cells import benchmark
    from harness.suites import load_suite
    from tests.harness.test_runner import write_suite

    lsh = {"name": "lsh", "n_hashes": 1, "bucket_size": 16, "backend": ["ops", "auto"]}
    cells = load_suite(write_suite(tmp_path, "backends", [lsh, {"name": "full"}], [32], mode="forward_backward")).cells()
    rows = {cell.label: {**cell.to_row(), **benchmark.measure_cell(cell, limit_memory=False)} for cell in cells}
    assert rows["lsh backend=ops"][ATTENTION_BACKEND_COLUMN] == "ops"
    assert rows["lsh backend=auto"][ATTENTION_BACKEND_COLUMN] == resolve("auto")
    assert rows["lsh backend=ops"]["backend"] == "ops" and ATTENTION_BACKEND_COLUMN not in rows["full"]
