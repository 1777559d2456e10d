"""The fused CPU kernel of LSH attention's chunked part (`lsh_cpu.c`): build, load, call.

`LSHCore` runs its blocks of chunks with PyTorch ops everywhere; on CPU, for float32 without
dup_correction, it calls this kernel instead when it is available. The kernel is plain C (no torch
headers), compiled on first use with the system C compiler (`$CC`, else `cc` / `gcc`) into a cache
folder and loaded with ctypes. The chunk matmuls are its own (register blocks, no packing); the
hashing matmul calls the `sgemm_` that torch itself links (MKL in the x86 wheels), found in torch's
own library. No compiler, no `sgemm_`, or a failed build: the
PyTorch-ops path runs, and `status()` says why. `REFORMER_LSH_CPU_KERNEL=0` turns the kernel off
(A/B comparisons, tests of the fallback).

Why a kernel (docs/performance.md, item 23): each chunk's [c, 2c] logits, softmax and six small
matmuls run while the tile is in L1/L2 and its span's rows are gathered once, where the ops path
makes several passes over the [n_hashes * L, 2c] probabilities and pays Python per block.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lsh_cpu.c")
# Full fast-math is avoided: linked into a shared library it sets flush-to-zero for the process.
CFLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fPIC",
    "-shared",
]
if platform.machine().lower() in ("x86_64", "amd64"):
    CFLAGS.append("-mprefer-vector-width=256")  # GCC's Zen tuning picks 128-bit vectors (expf 4 at a time)
# Extra compiler flags, appended after CFLAGS (part of the build's cache key): `-mno-avx512f` builds the
# AVX2 path on an AVX-512 machine (CI tests both paths that way), `-march=x86-64` the generic one.
CFLAGS_EXTRA_ENV = "REFORMER_LSH_CPU_CFLAGS_EXTRA"
# Whether `LSHCore` keeps the kernel's probabilities [BH, N, 2c] for the backward (save_probs) or the
# backward recomputes them from the row max (one more q.k matmul and exp per chunk; deterministic, so
# the same values). None: by the ISA (`keep_probs`). True / False force it (A/B comparisons, tests).
KEEP_PROBS: bool | None = None
# Chunks per stretch: a stretch's gathered rows ((stretch + 1) * c rows of qk, keys and v) stay in L2.
STRETCH_CHUNKS = 4

_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("REFORMER_HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "reformer-harness"
    )
    return Path(root)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cflags() -> list[str]:
    """The flags the kernel is built with: CFLAGS, then those of $REFORMER_LSH_CPU_CFLAGS_EXTRA (shell words)."""
    return CFLAGS + shlex.split(os.environ.get(CFLAGS_EXTRA_ENV, ""))


def _build(compiler: str) -> Path:
    """Compile SOURCE into the cache (named by the source, flags, compiler and CPU) unless already there."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = cflags()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"lsh_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE), "-lpthread", "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _blas_symbols() -> tuple[int, int | None, int | None]:
    """Addresses of sgemm_ and (MKL, else None) mkl_set_num_threads_local_ and the per-thread buffer
    release mkl_serv_thread_free_buffers in torch's CPU library."""
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libtorch_cpu.*")) + sorted(lib_dir.glob("libtorch.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        try:
            sgemm = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
        except AttributeError:
            continue
        optional = []
        for name in ("mkl_set_num_threads_local_", "mkl_serv_thread_free_buffers"):
            try:
                optional.append(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
            except AttributeError:
                optional.append(None)
        return sgemm, *optional
    raise RuntimeError(f"no sgemm_ in torch's libraries under {lib_dir}")


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (set CC, or install cc / gcc)")
    lib = ctypes.CDLL(str(_build(compiler)))
    sgemm, local_threads, thread_free = _blas_symbols()
    # Without MKL's per-thread control each kernel thread's sgemm_ could start BLAS threads of its own
    # (n^2 threads, and not every BLAS build is safe to call from several threads): one thread then.
    _state["threads_ok"] = local_threads is not None
    if lib.lsh_cpu_init(ctypes.c_void_p(sgemm), ctypes.c_void_p(local_threads), ctypes.c_void_p(thread_free)) != 0:
        raise RuntimeError("lsh_cpu_init failed")
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    common = [ptr, ptr, ptr, i64, i64, i32, i32, i32, f32, f32, i32, i32]
    lib.lsh_cpu_forward.argtypes = common + [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64]
    lib.lsh_cpu_backward.argtypes = common + [ptr, ptr, ptr, ptr, ptr, ptr, i64]
    lib.lsh_cpu_hash.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i32, ptr, i32, ptr, i32, i32, ptr]
    lib.lsh_cpu_combine.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, i32, i32, ptr]
    lib.lsh_cpu_combine.restype = None
    lib.lsh_cpu_sort.argtypes = [ptr, i64, i64, i64, i64, i64, i32, i32, ptr, ptr, ptr]
    lib.lsh_cpu_isa.argtypes, lib.lsh_cpu_isa.restype = [], ctypes.c_char_p
    _state["isa"] = lib.lsh_cpu_isa().decode()
    if hasattr(lib, "lsh_cpu_profile"):  # a build with -DLSH_CPU_PROFILE
        lib.lsh_cpu_profile.argtypes, lib.lsh_cpu_profile.restype = [ptr], ctypes.c_int
        lib.lsh_cpu_profile_sections.argtypes, lib.lsh_cpu_profile_sections.restype = [], ctypes.c_char_p
    return lib


def profile_sections() -> dict[str, float] | None:
    """Where the kernel's time went since the last call, in a build with ``-DLSH_CPU_PROFILE`` (in
    $REFORMER_LSH_CPU_CFLAGS_EXTRA): section name ("forward gather", "backward dV", ...) -> wall ms
    summed over the kernel's threads, then zeroed. None for a build without it or no kernel."""
    status()
    lib = _state.get("lib")
    if lib is None or not hasattr(lib, "lsh_cpu_profile"):
        return None
    names = lib.lsh_cpu_profile_sections().decode().split(",")
    ns = (ctypes.c_uint64 * len(names))()
    lib.lsh_cpu_profile(ns)
    return {name: value / 1e6 for name, value in zip(names, ns)}


def load_build(source: Path | None = None, extra_flags: str = "") -> dict:
    """Build (or find in the cache) and load the kernel of `source` (default SOURCE) with `extra_flags`
    after $REFORMER_LSH_CPU_CFLAGS_EXTRA's, and make it the kernel in use; returns its load state for
    `use_build`, so that one process can time several builds in turn (scripts/lsh_cpu_stages.py). The
    environment and SOURCE are left as they were; `status()` says whether the build loaded."""
    global SOURCE, _state
    default_source, environment = SOURCE, os.environ.get(CFLAGS_EXTRA_ENV)
    SOURCE, _state = source or default_source, {}
    os.environ[CFLAGS_EXTRA_ENV] = f"{environment or ''} {extra_flags}".strip()
    try:
        status()
    finally:
        SOURCE = default_source
        if environment is None:
            os.environ.pop(CFLAGS_EXTRA_ENV, None)
        else:
            os.environ[CFLAGS_EXTRA_ENV] = environment
    return _state


def use_build(state: dict) -> None:
    """Make the kernel of a `load_build` state the one in use."""
    global _state
    _state = state


def status() -> str:
    """'fused C kernel, ... ISA <isa> (<path>)' when the kernel is loaded, else 'PyTorch ops: <why>' (builds
    it on first call). Recorded in every run's environment (`register_backend` in lsh.py)."""
    if "status" not in _state:
        if os.environ.get("REFORMER_LSH_CPU_KERNEL", "1") == "0":
            _state["lib"], _state["status"] = None, "PyTorch ops: REFORMER_LSH_CPU_KERNEL=0"
        else:
            try:
                _state["lib"] = _load()
                one = "" if _state["threads_ok"] else "; one thread (this BLAS has no per-thread control)"
                _state["status"] = (
                    f"fused C kernel, used for float32 CPU tensors without dup_correction; ISA {_state['isa']} ({_state['lib']._name}{one})"
                )
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _state["lib"], _state["status"] = None, f"PyTorch ops: {error}"
    return _state["status"]


def isa() -> str | None:
    """The instruction set the loaded kernel was compiled for: 'avx512' (16-lane zmm chunk matmuls and
    softmax), 'avx2' (8-lane ymm), 'generic' (what the compiler's target gives), or None when not loaded."""
    status()
    return _state.get("isa") if _state.get("lib") is not None else None


def keep_probs() -> bool:
    """Whether the kernel's forward keeps the probabilities for its backward: KEEP_PROBS when set, else
    on the 8-lane builds (measured faster there, docs/performance.md item 36) but not on AVX-512, where
    recomputing them is cheaper than streaming the buffer out, faulting it in and reading it back
    (item 37; the step's peak memory loses that buffer too)."""
    return KEEP_PROBS if KEEP_PROBS is not None else isa() != "avx512"


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs for tensors of this device and dtype: CPU float32, and the kernel is loaded."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    status()
    return _state["lib"] is not None


def usable(x: torch.Tensor) -> bool:
    """`available` for x's device and dtype, and x is contiguous (the kernel reads raw memory)."""
    return x.is_contiguous() and available(x.device, x.dtype)


def _ptr(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(x.data_ptr() if x is not None else None)


def _common(table, key_scale, rows, bh, n_items, chunk, causal, mask_value, self_value) -> list:
    for name, x in (("table", table), ("key_scale", key_scale), ("rows", rows)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return [
        _ptr(table),
        _ptr(key_scale),
        _ptr(rows),
        bh,
        n_items,
        chunk,
        table.shape[1] // 2,
        int(causal),
        mask_value,
        self_value,
        STRETCH_CHUNKS,
        threads(),
    ]


def threads() -> int:
    """Threads the kernel runs on: torch's count, or 1 when the BLAS cannot be kept single-threaded per thread."""
    status()
    return torch.get_num_threads() if _state.get("threads_ok") else 1


def forward(
    table: torch.Tensor,
    key_scale: torch.Tensor,
    rows: torch.Tensor,
    *,
    chunk: int,
    causal: bool,
    mask_value: float,
    self_value: float,
    probs: torch.Tensor | None,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    out: torch.Tensor | None,
    combined: torch.Tensor | None = None,
    lse_max: torch.Tensor | None = None,
    lse_sum: torch.Tensor | None = None,
    item_scale: torch.Tensor | None = None,
    seq_len: int = 0,
) -> None:
    """Chunked attention of every chunk, written into probs [BH, N, 2c] (None: not kept), row_max and
    row_sum [BH, N, 1], and out [BH, N, d].

    table [R, 2d] float32 (qk | v rows), key_scale [R, 1], rows [BH, c + N] int64 (`SortedItems.rows`).
    out is E @ V with E = exp(logits - row max) unnormalised, as `LSHCore` keeps it. With combined
    [R, d], lse_max and lse_sum [R] (initialised to 0, -inf, 0), item_scale [BH, N, 1] and seq_len
    instead of out, the rounds are combined per position on the fly: combined ends as the output
    sum_t w_t o_t / row sum_t, with w_t = exp(z_t - M) / S, M = lse_max the largest logsumexp z of
    the position's items and S = lse_sum = sum_t exp(z_t - M); item_scale = w_t / row sum_t. Then the
    work splits by heads (at most one thread per head).
    """
    bh, n_items = row_max.shape[0], row_max.shape[1]
    if (out is None) == (combined is None):
        raise ValueError("forward: give either out or combined (with lse_max and lse_sum)")
    if combined is not None and (lse_max is None or lse_sum is None or item_scale is None or seq_len < 1):
        raise ValueError("forward: combined needs lse_max, lse_sum, item_scale and seq_len")
    for name, x in (("out", out), ("combined", combined), ("lse_max", lse_max), ("lse_sum", lse_sum), ("item_scale", item_scale)):
        if x is not None and not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    args = _common(table, key_scale, rows, bh, n_items, chunk, causal, mask_value, self_value)
    code = _state["lib"].lsh_cpu_forward(
        *args,
        _ptr(probs),
        _ptr(row_max),
        _ptr(row_sum),
        _ptr(out),
        _ptr(combined),
        _ptr(lse_max),
        _ptr(lse_sum),
        _ptr(item_scale),
        seq_len,
    )
    if code != 0:
        raise MemoryError("lsh_cpu_forward: out of memory for its scratch buffers (or no thread could start)")


def backward(
    table: torch.Tensor,
    key_scale: torch.Tensor,
    rows: torch.Tensor,
    *,
    chunk: int,
    causal: bool,
    mask_value: float,
    self_value: float,
    probs: torch.Tensor | None,
    row_max: torch.Tensor,
    scale: torch.Tensor,
    grad_out: torch.Tensor,
    grad_dot: torch.Tensor,
    grad_table: torch.Tensor,
) -> None:
    """Adds the chunked attention's gradient w.r.t. the table into grad_table [R, 2d].

    probs [BH, N, 2c] as saved by `forward` (None: recomputed from row_max [BH, N, 1]); scale
    [BH, N, 1] = w_t / row sum per item; grad_out [R, d] the gradient of the combined output;
    grad_dot [R, 1] = dY . Y per row.
    """
    bh, n_items = row_max.shape[0], row_max.shape[1]
    for name, x in (("scale", scale), ("grad_out", grad_out), ("grad_dot", grad_dot), ("grad_table", grad_table)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    args = _common(table, key_scale, rows, bh, n_items, chunk, causal, mask_value, self_value)
    code = _state["lib"].lsh_cpu_backward(
        *args, _ptr(probs), _ptr(row_max), _ptr(scale), _ptr(grad_out), _ptr(grad_dot), _ptr(grad_table), table.shape[0]
    )
    if code != 0:
        raise MemoryError("lsh_cpu_backward: out of memory for its scratch buffers (or no thread could start)")


def hash_buckets(qk: torch.Tensor, rotations: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Angular-LSH buckets of qk [batch, heads, seq_len, d] (any strides, last one 1) -> [batch, heads, n_hashes, seq_len].

    rotations [heads, d, n_hashes, sum(factors) // 2]. As `lsh_hashing.hash_buckets` without the round
    offsets: factor f's bucket is the argmax over concat([x, -x]) of its slice of the rotated values
    (ties to the first index), combined as b_0 + factors[0] * (b_1 + factors[1] * ...). The rotated
    values are made a block of positions at a time (one matmul each) and never stored.
    """
    if not available(qk.device, qk.dtype) or qk.stride(-1) != 1:
        raise ValueError("hash_buckets: qk must be float32 on CPU with a contiguous last dimension, and the kernel loaded")
    batch, heads, seq_len, d = qk.shape
    n_hashes = rotations.shape[2]
    rotations = rotations.to(torch.float32).contiguous()
    halves = (ctypes.c_int * len(factors))(*(f // 2 for f in factors))
    out = torch.empty(batch, heads, n_hashes, seq_len, dtype=torch.int64)
    stride_b, stride_h, stride_l, _ = qk.stride()
    code = _state["lib"].lsh_cpu_hash(
        _ptr(qk),
        stride_b,
        stride_h,
        stride_l,
        batch,
        heads,
        seq_len,
        d,
        _ptr(rotations),
        n_hashes,
        halves,
        len(factors),
        threads(),
        _ptr(out),
    )
    if code != 0:
        raise MemoryError("lsh_cpu_hash: out of memory for its scratch buffers")
    return out


def combine(out: torch.Tensor, scale: torch.Tensor, undo: torch.Tensor, *, batch: int, heads: int, seq_len: int) -> torch.Tensor:
    """Rounds combined and unsorted: out [BH, N, d] (sorted items), scale [BH, N, 1], undo [BH, N] -> [B * L * H, d].

    Row (b * L + position) * H + h is the sum over rounds r of scale[i] * out[i] at the sorted index
    i = undo[b * H + h, r * L + position]: `_unsort(out * scale)` of lsh_core.py in one pass, without
    scaling out in place or a gather per round.
    """
    for name, x in (("out", out), ("scale", scale), ("undo", undo)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    n_hashes, d = undo.shape[1] // seq_len, out.shape[-1]
    combined = out.new_empty(batch * seq_len * heads, d)
    _state["lib"].lsh_cpu_combine(_ptr(out), _ptr(scale), _ptr(undo), batch, heads, seq_len, n_hashes, d, threads(), _ptr(combined))
    return combined


def sort_items(
    buckets: torch.Tensor, *, n_buckets: int, heads: int, seq_len: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stable counting sort per head of buckets [BH, N] (values in [0, n_buckets), item id r * L + position).

    Returns sort_idx [BH, N] (the item id at each sorted index), undo [BH, N] (its inverse) and rows
    [BH, chunk + N] (the table row (b * L + position) * H + h of each sorted item, the last chunk
    prepended): what argsort of bucket * L + position and the index arithmetic of `lsh_attention_packed` give.
    """
    if buckets.device.type != "cpu" or buckets.dtype != torch.int64 or not buckets.is_contiguous():
        raise ValueError("sort_items: buckets must be a contiguous int64 CPU tensor")
    status()
    if _state["lib"] is None:
        raise RuntimeError(f"sort_items: the kernel is not loaded ({status()})")
    bh, n_items = buckets.shape
    if buckets.numel() and (int(buckets.min()) < 0 or int(buckets.max()) >= n_buckets):
        raise ValueError(f"sort_items: buckets must lie in [0, {n_buckets})")
    sort_idx, undo = torch.empty_like(buckets), torch.empty_like(buckets)
    rows = buckets.new_empty(bh, chunk + n_items)
    code = _state["lib"].lsh_cpu_sort(
        _ptr(buckets), bh, n_items, n_buckets, heads, seq_len, chunk, threads(), _ptr(sort_idx), _ptr(undo), _ptr(rows)
    )
    if code != 0:
        raise MemoryError("lsh_cpu_sort: out of memory for its counts (or no thread could start)")
    return sort_idx, undo, rows
