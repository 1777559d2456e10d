"""The fused CPU kernel of LSH attention (variants/attention/lsh_cpu.c) against float64 references.

The kernel runs whenever a C compiler is present (CI has one), so these tests fail rather than skip
when it does not build there. References: the loop implementation of test_lsh (values), the
PyTorch-ops path in float64 (gradients; itself gradchecked in test_lsh) and argmax over
concat([x, -x]) (buckets).
"""

import os
import platform
import shutil
import time

import pytest
import torch

import variants
from tests.variants.test_lsh import pack, reference_lsh
from variants.attention import lsh_cpu
from variants.attention.lsh import lsh_attention_packed
from variants.attention.lsh_hashing import bucket_factors, draw_rotations, hash_buckets

HAS_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel's forward and backward calls (so a test knows the fused path ran)."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(lsh_cpu, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(lsh_cpu, name, counted)
    return calls


@pytest.fixture
def fresh_state(monkeypatch):
    """A clean load state, restored afterwards (status() is cached per process)."""
    monkeypatch.setattr(lsh_cpu, "_state", {})


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the PyTorch-ops path runs (tested in test_lsh)")
def test_kernel_builds_and_loads_where_a_compiler_is():
    assert lsh_cpu.status().startswith("fused C kernel"), lsh_cpu.status()
    assert lsh_cpu.available(torch.device("cpu"), torch.float32)
    assert not lsh_cpu.available(torch.device("cpu"), torch.float64)


def _expected_isa() -> str:
    """The ISA the kernel should report here: what -march=native (less -mno-avx512f) targets on this CPU."""
    try:
        flags = next(line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    if "avx512f" in flags and "-mno-avx512f" not in lsh_cpu.cflags():
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= set(flags) else "generic"


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 ISAs")
def test_kernel_reports_the_isa_it_was_built_for():
    """The status (recorded in every run's environment) names the path that runs: avx512 (16-lane
    zmm matmuls and softmax), avx2 or generic, as the build's flags and this CPU make it."""
    assert lsh_cpu.isa() == _expected_isa(), (lsh_cpu.cflags(), lsh_cpu.status())
    assert f"ISA {lsh_cpu.isa()}" in lsh_cpu.status()
    assert lsh_cpu.keep_probs() == (lsh_cpu.isa() != "avx512")


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_extra_flags_are_part_of_the_build(monkeypatch, fresh_state, tmp_path):
    """REFORMER_LSH_CPU_CFLAGS_EXTRA reaches the compiler and the cache key: another build, another file."""
    monkeypatch.setenv("REFORMER_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv(lsh_cpu.CFLAGS_EXTRA_ENV, "")
    lsh_cpu.status()
    monkeypatch.setattr(lsh_cpu, "_state", {})
    monkeypatch.setenv(lsh_cpu.CFLAGS_EXTRA_ENV, "-DLSH_CPU_TEST_FLAG=1 -O2")
    assert lsh_cpu.cflags()[-2:] == ["-DLSH_CPU_TEST_FLAG=1", "-O2"]
    assert lsh_cpu.status().startswith("fused C kernel"), lsh_cpu.status()
    assert len(list(tmp_path.glob("lsh_cpu-*.so"))) == 2


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_two_builds_load_side_by_side_and_switch(monkeypatch, fresh_state, tmp_path):
    """load_build adds flags after the environment's and leaves the environment as it was; use_build
    switches between loaded builds in one process (scripts/lsh_cpu_stages.py's A/B)."""
    monkeypatch.setenv("REFORMER_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv(lsh_cpu.CFLAGS_EXTRA_ENV, "-O2")
    plain = lsh_cpu.load_build()
    profiled = lsh_cpu.load_build(extra_flags="-DLSH_CPU_PROFILE")
    assert os.environ[lsh_cpu.CFLAGS_EXTRA_ENV] == "-O2" and lsh_cpu.SOURCE.name == "lsh_cpu.c"
    assert plain["lib"]._name != profiled["lib"]._name and len(list(tmp_path.glob("lsh_cpu-*.so"))) == 2
    assert lsh_cpu.profile_sections() is not None  # the last build loaded is in use
    lsh_cpu.use_build(plain)
    assert lsh_cpu.profile_sections() is None and lsh_cpu.status() == plain["status"]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("threads", [2], indirect=True)  # no more than the 2 heads: the forward combines them
def test_profile_build_accounts_for_the_kernels_time(monkeypatch, fresh_state, tmp_path, threads):
    """A -DLSH_CPU_PROFILE build (scripts/lsh_cpu_stages.py --sections) computes exactly what the plain
    build does, names the forward's and the backward's sections, and never claims more time than its
    threads had: a call's sections sum to at most threads x the call's wall time. A read zeroes them;
    the plain build has no sections."""
    monkeypatch.setenv("REFORMER_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(lsh_cpu, "KEEP_PROBS", False)  # the backward recomputes: its logits and softmax run
    qk, v = randn(1, 2, 512, 32, seed=3), randn(1, 2, 512, 32, seed=4)
    rotations = draw_rotations(2, 32, 2, sum(bucket_factors(None, 512, 16)), seed=5)
    upstream = randn(1, 512, 2, 32, seed=6).float()

    def run() -> tuple[torch.Tensor, torch.Tensor, dict, dict, float, float]:
        packed = pack(qk, v).float().requires_grad_()
        start = time.perf_counter()
        out = lsh_attention_packed(packed, rotations=rotations, n_hashes=2, bucket_size=16, causal=True, save_probs=True)
        forward_s = time.perf_counter() - start
        forward = lsh_cpu.profile_sections()
        start = time.perf_counter()
        (grad,) = torch.autograd.grad(out, packed, upstream)
        backward_s = time.perf_counter() - start
        return out, grad, forward, lsh_cpu.profile_sections(), forward_s, backward_s

    extra = os.environ.get(lsh_cpu.CFLAGS_EXTRA_ENV, "")  # CI's AVX2 leg: -mno-avx512f, and so its profile build
    plain_out, plain_grad, *sections = run()
    assert sections[:2] == [None, None]
    monkeypatch.setattr(lsh_cpu, "_state", {})
    monkeypatch.setenv(lsh_cpu.CFLAGS_EXTRA_ENV, f"{extra} -DLSH_CPU_PROFILE")
    out, grad, forward, backward, forward_s, backward_s = run()
    assert lsh_cpu.status().startswith("fused C kernel"), lsh_cpu.status()
    assert torch.equal(out, plain_out) and torch.equal(grad, plain_grad)
    assert list(forward) == list(backward) and len(forward) == 16
    passes = {"forward": (forward, forward_s), "backward": (backward, backward_s)}
    for name, (ms, seconds) in passes.items():
        mine = {k: v for k, v in ms.items() if k.startswith(name)}
        others = {k: v for k, v in ms.items() if not k.startswith(name)}
        assert set(others.values()) == {0.0}, others  # the other pass did not run
        assert all(v > 0 for k, v in mine.items() if "finish" not in k), mine
        assert sum(mine.values()) <= lsh_cpu.threads() * seconds * 1e3 * 1.01 + 0.05, (mine, seconds)
    assert set(lsh_cpu.profile_sections().values()) == {0.0}


def _fused_against_references(batch, heads, seq_len, head_dim, n_hashes, bucket, causal, save_probs, seed):
    qk, v = randn(batch, heads, seq_len, head_dim, seed=seed), randn(batch, heads, seq_len, head_dim, seed=seed + 1)
    rotations = draw_rotations(heads, head_dim, n_hashes, sum(bucket_factors(None, seq_len, bucket)), seed=seed + 2, dtype=torch.float64)
    upstream = randn(batch, seq_len, heads, head_dim, seed=seed + 3)
    kwargs = dict(n_hashes=n_hashes, bucket_size=bucket, causal=causal, save_probs=save_probs)

    packed64 = pack(qk, v).requires_grad_()
    ops = lsh_attention_packed(packed64, rotations=rotations, **kwargs)  # float64: the PyTorch-ops path
    (grad_ops,) = torch.autograd.grad(ops, packed64, upstream)

    packed32 = pack(qk, v).float().requires_grad_()
    fused = lsh_attention_packed(packed32, rotations=rotations.float(), **kwargs)
    (grad_fused,) = torch.autograd.grad(fused, packed32, upstream.float())

    expected, _ = reference_lsh(qk, v, rotations, bucket, causal, False)
    torch.testing.assert_close(fused.double(), expected.transpose(1, 2), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grad_fused.double(), grad_ops, rtol=1e-4, atol=5e-5)


@pytest.fixture
def threads(request):
    """Runs the test with torch (and so the kernel) on request.param threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 4], indirect=True)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("save_probs", [True, False])
@pytest.mark.parametrize(
    "batch, heads, n_hashes, bucket, head_dim",
    # With 4 threads: one head (forward split by chunks, private gradient tables), 4 heads (rounds
    # combined in the forward, backward by heads), 3 heads; with 1 thread every case combines.
    # Bucket 5 / head_dim 6: rows of 2c = 10 logits and 50-element tiles (the loops' scalar tails).
    # The AVX2 path's 4 x 16 register blocks: bucket 16 / head_dim 16 in whole blocks only;
    # bucket 8 / head_dim 20 with 4 edge columns where a product is d wide; bucket 10 / head_dim 20
    # with edge rows (c = 10) beside whole blocks and 4 edge columns of the 2c = 20 logits too.
    # The AVX-512 path's 8 x 32 blocks (row tails in blocks of 4 and 1, column tails masked):
    # bucket 16 / head_dim 32 in whole blocks only; bucket 12 / head_dim 40: 8 + 4 rows, 32 + 8
    # masked columns of d and 16 + 8 of 2c; bucket 7 / head_dim 48: rows 4 + 1 + 1 + 1 and 8 + 4 + 1 + 1,
    # columns 32 + 16 (a second vector wholly masked off) and 14 (one vector, 2 lanes off).
    # The AVX-512 gather's 16 x 16 register transposes (head_dim a multiple of 16): bucket 16 spans of
    # (stretch + 1) * 16 rows in whole blocks; bucket 7 / head_dim 48 spans of 35 rows, two blocks and
    # 3 rows after; head_dims 6, 8, 20, 40 take the scalar transposes.
    [
        (1, 1, 1, 8, 8),
        (2, 2, 3, 8, 8),
        (1, 3, 2, 8, 8),
        (1, 2, 3, 5, 6),
        (1, 2, 2, 16, 16),
        (1, 2, 2, 8, 20),
        (1, 2, 2, 10, 20),
        (1, 2, 2, 16, 32),
        (1, 2, 2, 12, 40),
        (1, 2, 2, 7, 48),
    ],
)
def test_fused_matches_loop_reference_and_ops_gradients(
    kernel_calls, threads, causal, save_probs, batch, heads, n_hashes, bucket, head_dim
):
    _fused_against_references(batch, heads, 8 * bucket, head_dim, n_hashes, bucket, causal, save_probs, seed=10 * n_hashes + heads)
    assert kernel_calls == {"forward": 1, "backward": 1}


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 4], indirect=True)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("batch, heads, n_hashes, bucket, head_dim", [(1, 1, 2, 8, 8), (1, 2, 3, 12, 40)])
def test_fused_with_kept_or_recomputed_probabilities(
    monkeypatch, kernel_calls, threads, causal, keep, batch, heads, n_hashes, bucket, head_dim
):
    """Both ways of the fused backward, whichever this build's default is: probabilities kept by the
    forward (streamed out) and read back, or recomputed from the row max (the other cases above run
    the default: kept on 8-lane builds, recomputed on AVX-512)."""
    monkeypatch.setattr(lsh_cpu, "KEEP_PROBS", keep)
    _fused_against_references(batch, heads, 8 * bucket, head_dim, n_hashes, bucket, causal, True, seed=7 * n_hashes + heads)
    assert kernel_calls == {"forward": 1, "backward": 1}


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts_agree(threads):
    """The work splits by heads, or by chunks with per-thread gradient tables: same numbers either way."""
    assert lsh_cpu.available(torch.device("cpu"), torch.float32), lsh_cpu.status()
    module = variants.build("lsh", d_model=32, n_heads=2, n_hashes=3, bucket_size=8, seed=4)
    x = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = module(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.set_num_threads(threads)
        out_t = module(x)
        (grad_t,) = torch.autograd.grad(out_t.square().sum(), x)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out_t, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_t, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("factors", [(8,), (4, 6), (16, 32)])
def test_fused_buckets_equal_argmax_with_ties(factors):
    assert lsh_cpu.available(torch.device("cpu"), torch.float32), lsh_cpu.status()
    # Small integers: every product and sum is exact in float32 whatever the summation order, so
    # the kernel's matmul and einsum agree bit for bit and ties are real ties on any machine.
    generator = torch.Generator().manual_seed(70)
    qk = torch.randint(-3, 4, (2, 3, 45, 8), generator=generator).float()  # 45: a tail past the last group of eight
    qk[0, 1, :5] = 0.0  # every rotation ties: argmax takes the first index
    rotations = torch.randint(-3, 4, (3, 8, 2, sum(factors) // 2), generator=generator).float()
    rotated = torch.einsum("bhld,hdnr->bhnlr", qk, rotations)
    expected, start, product = torch.zeros(rotated.shape[:-1], dtype=torch.long), 0, 1
    for factor in factors:
        part = rotated[..., start : start + factor // 2]
        expected += product * torch.cat([part, -part], -1).argmax(-1)
        start, product = start + factor // 2, product * factor
    offsets = product * torch.arange(2).view(2, 1)
    torch.testing.assert_close(hash_buckets(qk, 2, factors, rotations), expected + offsets, rtol=0, atol=0)


def test_kernel_off_runs_the_ops_path(monkeypatch, fresh_state, kernel_calls):
    monkeypatch.setenv("REFORMER_LSH_CPU_KERNEL", "0")
    assert lsh_cpu.status() == "PyTorch ops: REFORMER_LSH_CPU_KERNEL=0"
    assert not lsh_cpu.available(torch.device("cpu"), torch.float32)
    _fused_against_references(1, 2, 64, 8, 2, 8, True, True, seed=40)
    assert kernel_calls == {"forward": 0, "backward": 0}


def test_failed_build_falls_back_with_the_reason(monkeypatch, fresh_state, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REFORMER_HARNESS_CACHE", str(tmp_path / "cache"))
    assert lsh_cpu.status().startswith("PyTorch ops:"), lsh_cpu.status()
    assert "no-such-compiler" in lsh_cpu.status()
    module = variants.build("lsh", d_model=16, n_heads=2, n_hashes=2, bucket_size=4, seed=1)
    assert torch.isfinite(module(torch.randn(1, 32, 16))).all()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_build_is_cached_by_content(monkeypatch, fresh_state, tmp_path):
    monkeypatch.setenv("REFORMER_HARNESS_CACHE", str(tmp_path))
    assert lsh_cpu.status().startswith("fused C kernel")
    built = list(tmp_path.glob("lsh_cpu-*.so"))
    assert len(built) == 1 and str(built[0]) in lsh_cpu.status()
    monkeypatch.setattr(lsh_cpu, "_state", {})
    lsh_cpu.status()
    assert list(tmp_path.glob("*")) == built  # loaded again, not rebuilt (no temporaries left either)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_counting_sort_equals_argsort_of_bucket_then_position():
    batch, heads, n_hashes, seq_len, chunk, per_round = 2, 3, 3, 40, 8, 6
    generator = torch.Generator().manual_seed(72)
    buckets = torch.randint(0, per_round, (batch * heads, n_hashes, seq_len), generator=generator)  # many ties
    buckets += per_round * torch.arange(n_hashes).view(1, n_hashes, 1)
    buckets = buckets.view(batch * heads, -1)
    sort_idx, undo, rows = lsh_cpu.sort_items(buckets, n_buckets=n_hashes * per_round, heads=heads, seq_len=seq_len, chunk=chunk)

    position = torch.arange(seq_len).repeat(n_hashes)
    expected = torch.tensor([sorted(range(buckets.shape[1]), key=lambda i: (int(b[i]), int(position[i]))) for b in buckets])
    torch.testing.assert_close(sort_idx, expected, rtol=0, atol=0)
    torch.testing.assert_close(undo.gather(1, sort_idx), torch.arange(buckets.shape[1]).expand_as(undo), rtol=0, atol=0)
    head = torch.arange(batch * heads).unsqueeze(1)
    table_rows = ((head // heads) * seq_len + expected % seq_len) * heads + head % heads
    torch.testing.assert_close(rows, torch.cat([table_rows[:, -chunk:], table_rows], 1), rtol=0, atol=0)
