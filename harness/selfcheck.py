"""`harness selfcheck`: one command that exercises every device path of the harness and says PASS/FAIL/SKIP.

A fixed list of checks (`plan_checks`), each printed as one line `STATUS name  detail  seconds`:

- `device`: the device answers (CUDA: name, capability, `CUDA_VISIBLE_DEVICES`);
- `variant/<name>/<dtype>`: every registered variant (all kinds, peers where installed), forward and
  backward on the device in float32 / bfloat16 / float16 against a float64 CPU reference with the same
  weights and inputs (the low-precision values, widened), causal and not where the variant takes it;
- `lsh/rounds=<n>/<causal|bidirectional>/<dtype>`: the LSH core (its default backend: on CUDA with
  triton the Triton kernels) with 1/2/4/8 hash rounds, output and gradients against float64 with the
  same rotations (plus, without --quick, a long sequence, and the ops path's recomputing backward
  and dup_correction);
- `lsh_triton/rounds=<n>/<causal|bidirectional>/<dtype>`: the same for the Triton kernels (backend
  'triton'; CUDA only, SKIP elsewhere or without triton);
- `timer`, `peak_memory`, `nvml`, `oom`, `pool`, `suite`: the measurement and runner machinery.

`run_selfcheck` runs them and writes `selfcheck.json` (every result, the environment) under `out`.
The exit status (`Summary.exit_code`) is 1 when any check FAILs. `SelfcheckError` is unusable input
(CUDA asked for but not available, an `only` pattern that matches nothing, an unwritable `out`).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml

import variants
from harness import measurement as measure
from harness.environment import capture_environment, code_version, device_name
from variants.registry import VariantUnavailable
from variants.registry import backends as variant_backends

REPO_ROOT = Path(__file__).resolve().parent.parent
SUMMARY_FILE = "selfcheck.json"
DTYPES = ("float32", "bfloat16", "float16")
LSH_ROUNDS = (1, 2, 4, 8)
SEED = 0
MIB = 1024 * 1024


class SelfcheckError(Exception):
    """Unusable input for the selfcheck (the command line turns it into exit status 2)."""


class Skip(Exception):
    """Raised by a check that does not apply here; the message says why."""


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error, as max |device - reference| / max |reference| of each tensor."""

    forward: float
    grad: float


# float32 leaves room for other kernels' summation orders (cuBLAS, SDPA) and catches a wrong formula;
# the low-precision bounds allow the rounding that builds up over a layer stack (worst on this CPU: the
# LM's first LayerNorm weight gradient, 0.13 in bfloat16 and 0.024 in float16) and catch a wrong or
# overflowing low-precision path.
TOLERANCES = {
    "float32": Tolerance(forward=1e-4, grad=1e-3),
    "bfloat16": Tolerance(forward=5e-2, grad=2.5e-1),
    "float16": Tolerance(forward=1e-2, grad=6e-2),
}
# LSH inputs are redrawn until every hash has this margin (relative to the largest rotated value)
# between its best and second-best bucket, so rounding in the device dtype cannot change a bucket.
HASH_MARGINS = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass
class Outcome:
    """What a check found: status PASS / FAIL / SKIP, a one-line detail and JSON-able data."""

    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckResult:
    """One finished check: its outcome and wall time in seconds."""

    name: str
    status: str
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)

    def line(self, name_width: int = 0) -> str:
        """`STATUS name  detail  seconds`, the name padded to `name_width`."""
        return f"{self.status}  {self.name.ljust(name_width)}  {self.detail}  {self.seconds:.2f}s"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 4), "data": self.data}


@dataclass
class Context:
    """What every check gets: the device under test, --quick, and a scratch folder of its own."""

    device: torch.device
    quick: bool
    workdir: Path


@dataclass(frozen=True)
class Check:
    """A named check: `run(context)` returns an Outcome or raises Skip (any other exception is a FAIL)."""

    name: str
    run: Callable[[Context], Outcome]


@dataclass
class Summary:
    """One selfcheck: what it planned, the results so far, its wall time in seconds, the environment of
    this machine, and whether every planned check has run (the JSON is rewritten after each one)."""

    device: str
    quick: bool
    planned: list[str]
    started_at: str
    code_version: str
    environment: dict[str, Any]
    results: list[CheckResult] = field(default_factory=list)
    wall_s: float = 0.0
    finished: bool = False
    path: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in ("PASS", "FAIL", "SKIP")}

    @property
    def exit_code(self) -> int:
        """1 when any check failed, else 0."""
        return 1 if self.counts["FAIL"] else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_name": device_name(self.device),
            "quick": self.quick,
            "started_at": self.started_at,
            "wall_s": round(self.wall_s, 3),
            "finished": self.finished,
            "ok": self.finished and self.exit_code == 0,
            "counts": self.counts,
            "planned": self.planned,
            "code_version": self.code_version,
            "command": list(sys.argv),
            "checks": [r.as_dict() for r in self.results],
            "environment": self.environment,
        }


# --------------------------------------------------------------------------- comparing with float64


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| in float64 (the absolute error when the reference is 0)."""
    actual, reference = actual.detach().double().cpu(), reference.detach().double()
    scale = reference.abs().max().item() if reference.numel() else 0.0
    error = (actual - reference).abs().max().item() if reference.numel() else 0.0
    return error / scale if scale > 0 else error


def widened(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` rounded to `dtype` and back to float64: the exact values the device run starts from."""
    return tensor.to(dtype).to(torch.float64)


def compare(device_run: dict[str, torch.Tensor], reference_run: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every tensor of a run against the reference run (None gradients count as 0)."""
    errors = {}
    for key, reference in reference_run.items():
        actual = device_run.get(key)
        if reference is None and actual is None:
            continue
        if reference is None:
            reference = torch.zeros_like(actual, dtype=torch.float64)
        if actual is None:
            actual = torch.zeros_like(reference)
        errors[key] = relative_error(actual, reference)
    return errors


def judge(errors: dict[str, float], tolerance: Tolerance) -> Outcome:
    """PASS when the output is within `tolerance.forward` and every gradient within `tolerance.grad`."""
    outputs = {k: v for k, v in errors.items() if is_output(k)}
    grads = {k: v for k, v in errors.items() if not is_output(k)}
    worst_output = max(outputs, key=lambda k: nan_last(outputs[k]), default=None)
    worst_grad = max(grads, key=lambda k: nan_last(grads[k]), default=None)
    fwd = outputs[worst_output] if worst_output else 0.0
    grad = grads[worst_grad] if worst_grad else 0.0
    data = {
        "errors": {k: v if math.isfinite(v) else str(v) for k, v in errors.items()},  # JSON has no NaN
        "tolerance": {"forward": tolerance.forward, "grad": tolerance.grad},
    }
    summary = f"fwd {fwd:.1e} grad {grad:.1e} (tol {tolerance.forward:.2g}/{tolerance.grad:.2g})"
    if not fwd <= tolerance.forward:  # also catches NaN
        return Outcome("FAIL", f"{worst_output} off by {fwd:.2e} > tol {tolerance.forward:.2g}; {summary}", data)
    if not grad <= tolerance.grad:
        return Outcome("FAIL", f"gradient of {worst_grad} off by {grad:.2e} > tol {tolerance.grad:.2g}; {summary}", data)
    return Outcome("PASS", summary, data)


def is_output(key: str) -> bool:
    """Whether an error key names the forward output ("output", "output/causal") rather than a gradient."""
    return key.split("/")[0] == "output"


def nan_last(value: float) -> float:
    """Sort key putting NaN above every number, so the worst error found is a NaN when there is one."""
    return math.inf if math.isnan(value) else value


# --------------------------------------------------------------------------- every registered variant

VARIANT_BATCH, VARIANT_SEQ_LEN = 2, 32
# Small settings given to whichever variant has the field. With bucket_size = seq_len / 2 and one
# hash round an LSH layer has two chunks that see each other, so its output does not depend on its
# (device-drawn) rotations and a CPU reference can reproduce it; `lsh/*` checks the hashing itself.
SMALL_SETTINGS: dict[str, Any] = {
    "d_model": 32,
    "n_heads": 2,
    "d_ff": 64,
    "n_layers": 2,
    "vocab_size": 61,
    "max_seq_len": 64,
    "bucket_size": VARIANT_SEQ_LEN // 2,
    "n_hashes": 1,
    "n_chunks": 2,
    "ffn_chunks": 2,
}


class ProbeLayer(nn.Module):
    """Linear(tanh(x)): a deterministic f or g for the residual variants, [B, L, d] -> [B, L, d]. It ends
    in a Linear, which (like the real layers) does not keep its own output for the backward."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(x))

    def flops(self, batch: int, seq_len: int) -> int:
        return 2 * batch * seq_len * self.linear.in_features * self.linear.out_features


def small_settings(name: str, causal: bool | None) -> dict[str, Any]:
    """The SMALL_SETTINGS that variant `name` takes, with `causal` where it has that field."""
    fields = variants.spec(name).parameters()
    settings = {k: v for k, v in SMALL_SETTINGS.items() if k in fields}
    if causal is not None and "causal" in fields:
        settings["causal"] = causal
    return settings


def takes_settings(name: str, causal: bool | None) -> bool:
    """Whether variant `name`'s config accepts `small_settings(name, causal)` (linformer has no causal form)."""
    try:
        variants.make_config(name, **small_settings(name, causal))
    except (ValueError, TypeError):
        return False
    return True


def build_small(name: str, causal: bool | None) -> nn.Module:
    """Variant `name` at small sizes in float64 on the CPU, seeded (residual stacks get two ProbeLayer pairs)."""
    torch.manual_seed(SEED)
    variant = variants.spec(name)
    settings = small_settings(name, causal)
    if variant.kind == "residual":
        layers = [(ProbeLayer(SMALL_SETTINGS["d_model"]), ProbeLayer(SMALL_SETTINGS["d_model"])) for _ in range(2)]
        module = variant.module_cls(variants.make_config(name, **settings), layers)
    else:
        module = variants.build(name, **settings)
    return module.to(torch.float64)


def variant_inputs(kind: str, module: nn.Module) -> torch.Tensor:
    """float64 inputs of a small module: tokens [B, L] for a model, else activations [B, L, d_model]."""
    generator = torch.Generator().manual_seed(SEED + 1)
    if kind == "model":
        return torch.randint(0, SMALL_SETTINGS["vocab_size"], (VARIANT_BATCH, VARIANT_SEQ_LEN), generator=generator)
    return torch.randn(VARIANT_BATCH, VARIANT_SEQ_LEN, SMALL_SETTINGS["d_model"], generator=generator, dtype=torch.float64)


def forward_backward(module: nn.Module, inputs: torch.Tensor, probe_seed: int = SEED + 2) -> dict[str, torch.Tensor | None]:
    """Output and gradients of sum(module(inputs) * probe) (probe: fixed random, like the workloads):
    {"output": ..., "input": d/d inputs (float inputs only), "<parameter name>": its gradient}."""
    module.train()
    torch.manual_seed(SEED)  # randomness inside the layer (dropout is 0; unseeded rotations) drawn alike
    inputs = inputs.detach().requires_grad_(inputs.is_floating_point())
    output = module(inputs)
    probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    (output * probe.to(output.device, output.dtype)).sum().backward()
    run = {"output": output.detach(), "input": inputs.grad if inputs.is_floating_point() else None}
    run.update({name: p.grad for name, p in module.named_parameters()})
    return run


def on_device(master: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of the float64 master in `dtype` on `device`."""
    return copy.deepcopy(master).to(device=device, dtype=dtype)


def rounded_reference(master: nn.Module, dtype: torch.dtype, module_cls: type[nn.Module] | None = None) -> nn.Module:
    """A float64 CPU copy of the master whose parameters are exactly the device copy's (rounded to `dtype`);
    `module_cls` rebuilds it as that (registered ancestor) class with the same config and state."""
    if module_cls is None:
        reference = copy.deepcopy(master)
    else:
        reference = module_cls(master.config).to(torch.float64)
        reference.load_state_dict(master.state_dict())
    with torch.no_grad():
        for parameter in reference.parameters():  # buffers (constants such as mask values) stay as they are
            parameter.copy_(widened(parameter, dtype))
    return reference


def registered_ancestors(name: str) -> list[tuple[str, type[nn.Module]]]:
    """(name, class) of the registered variants that variant `name`'s class derives from, nearest first
    (e.g. a variant that forces one kernel of another): its reference where it cannot run in float64 on CPU."""
    by_class = {variants.spec(other).module_cls: other for other in variants.available()}
    own = variants.spec(name).module_cls
    return [(by_class[cls], cls) for cls in own.__mro__[1:] if cls in by_class]


def reference_run(name: str, master: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> tuple[dict, str]:
    """The float64 CPU run of the master with rounded weights and inputs, and which variant computed it."""
    reference_inputs = widened(inputs, dtype) if inputs.is_floating_point() else inputs
    try:
        return forward_backward(rounded_reference(master, dtype), reference_inputs), name
    except VariantUnavailable:
        for ancestor, cls in registered_ancestors(name):
            try:
                return forward_backward(rounded_reference(master, dtype, cls), reference_inputs), ancestor
            except VariantUnavailable:
                continue
        raise Skip(f"no float64 CPU reference: {name} cannot run there and derives from no registered variant that can") from None


def check_variant(name: str, dtype_name: str, context: Context) -> Outcome:
    """Forward + backward of variant `name` on the device in `dtype_name` against its float64 CPU reference."""
    variant = variants.spec(name)
    if variant.kind not in ("attention", "feedforward", "residual", "model"):
        raise Skip(f"kind {variant.kind!r}: no recipe to build and feed it")
    dtype = measure.DTYPES[dtype_name]
    causal_settings = tuple(c for c in ((False, True) if "causal" in variant.parameters() else (None,)) if takes_settings(name, c))
    if not causal_settings:
        raise Skip("its config rejects the small settings in both masking modes")
    errors: dict[str, float] = {}
    references = set()
    for causal in causal_settings:
        try:
            master = build_small(name, causal)
            inputs = variant_inputs(variant.kind, master)
            device_inputs = inputs.to(context.device, dtype) if inputs.is_floating_point() else inputs.to(context.device)
            device_run = forward_backward(on_device(master, context.device, dtype), device_inputs)
        except VariantUnavailable as error:
            raise Skip(f"variant unavailable here: {first_line(error)}") from None
        reference, reference_name = reference_run(name, master, inputs, dtype)
        references.add(reference_name)
        suffix = "" if causal is None else ("/causal" if causal else "/bidirectional")
        errors.update({f"{key}{suffix}": value for key, value in compare(device_run, reference).items()})
    outcome = judge(errors, TOLERANCES[dtype_name])
    outcome.data["reference"] = sorted(references)
    if references != {name}:
        outcome.detail += f"; reference: {', '.join(sorted(references))} (float64, cpu)"
    return outcome


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# --------------------------------------------------------------------------- the LSH core, hash rounds


@dataclass(frozen=True)
class LshCase:
    """One call of the LSH core: qk, v [batch, heads, seq_len, head_dim], chunks of bucket_size tokens,
    n_buckets per round (rotations [heads, head_dim, n_hashes, n_buckets / 2])."""

    n_hashes: int
    causal: bool
    batch: int = 2
    heads: int = 2
    seq_len: int = 256
    head_dim: int = 16
    bucket_size: int = 16
    n_buckets: int = 8
    save_probs: bool = True
    dup_correction: bool = False
    backend: str = "auto"  # on the device; the float64 CPU reference always takes the ops path


LSH_TRITON_ROUNDS = (1, 4)
LONG_LSH = {"batch": 1, "seq_len": 4096, "head_dim": 32, "bucket_size": 64, "n_buckets": 64}
MAX_REDRAWS = 500


def weak_hashes(qk: torch.Tensor, rotations: torch.Tensor, margin: float) -> torch.Tensor:
    """[batch, heads, seq_len] True where some round's best bucket (argmax of concat([qk R, -qk R]))
    leads the second best by less than `margin` times the largest rotated value (float64)."""
    rotated = torch.einsum("bhld,hdrk->bhlrk", qk, rotations)
    values = torch.cat([rotated, -rotated], dim=-1)
    best = values.topk(2, dim=-1).values
    return ((best[..., 0] - best[..., 1]) < margin * values.abs().amax(dim=-1)).any(dim=-1)


def lsh_inputs(case: LshCase, dtype_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 qk, v and rotations holding values exact in `dtype_name`; qk rows are redrawn until every
    hash clears HASH_MARGINS[dtype_name], so the device's rounding cannot move an item to another bucket."""
    dtype = measure.DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(SEED + 7 * case.n_hashes + case.causal)

    def draw(*shape: int) -> torch.Tensor:
        return widened(torch.randn(*shape, generator=generator, dtype=torch.float64), dtype)

    rotations = draw(case.heads, case.head_dim, case.n_hashes, case.n_buckets // 2)
    qk = draw(case.batch, case.heads, case.seq_len, case.head_dim)
    for _ in range(MAX_REDRAWS):
        weak = weak_hashes(qk, rotations, HASH_MARGINS[dtype_name])
        if not weak.any():
            break
        qk[weak] = draw(int(weak.sum()), case.head_dim)
    else:
        raise RuntimeError(f"could not draw LSH inputs with hash margins >= {HASH_MARGINS[dtype_name]}")
    return qk, draw(case.batch, case.heads, case.seq_len, case.head_dim), rotations


def lsh_run(case: LshCase, qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Output and qk / v gradients of sum(lsh_attention(qk, v) * probe) on the tensors' device and dtype."""
    from variants.attention.lsh import lsh_attention  # the LSH core itself, not a registered layer

    qk, v = qk.detach().requires_grad_(True), v.detach().requires_grad_(True)
    out = lsh_attention(
        qk,
        v,
        n_hashes=case.n_hashes,
        bucket_size=case.bucket_size,
        causal=case.causal,
        rotations=rotations,
        save_probs=case.save_probs,
        dup_correction=case.dup_correction,
        backend=case.backend,
    )
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED + 3), dtype=torch.float64)
    (out * probe.to(out.device, out.dtype)).sum().backward()
    return {"output": out.detach(), "qk": qk.grad, "v": v.grad}


def check_lsh(case: LshCase, dtype_name: str, context: Context) -> Outcome:
    """The LSH core with `case.n_hashes` rounds on the device in `dtype_name` against float64 on the CPU,
    same rotations and inputs: output and the qk / v gradients."""
    dtype = measure.DTYPES[dtype_name]
    if case.backend == "triton":
        if context.device.type != "cuda":
            raise Skip("the Triton kernels run on CUDA (on CPU: tests/variants/test_lsh_triton.py, in Triton's interpreter)")
        from variants.attention.lsh_backends import resolve_backend

        try:
            resolve_backend("triton", context.device, dtype, head_dim=case.head_dim, bucket_size=case.bucket_size)
        except VariantUnavailable as error:
            raise Skip(str(error)) from None
    qk, v, rotations = lsh_inputs(case, dtype_name)
    device_run = lsh_run(case, *(t.to(context.device, dtype) for t in (qk, v, rotations)))
    reference = lsh_run(replace(case, backend="ops"), qk, v, rotations)
    outcome = judge(compare(device_run, reference), TOLERANCES[dtype_name])
    outcome.data["case"] = {k: getattr(case, k) for k in case.__dataclass_fields__}
    return outcome


# --------------------------------------------------------------------------- measurement machinery


def check_device(context: Context) -> Outcome:
    """The device runs a kernel; what it is (CUDA: name, capability, memory, CUDA_VISIBLE_DEVICES)."""
    device = context.device
    value = (torch.arange(4, device=device, dtype=torch.float32) * 2).sum().item()
    if value != 12.0:
        return Outcome("FAIL", f"2 * (0 + 1 + 2 + 3) gave {value} on {device}, not 12")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        detail = (
            f"{properties.name} sm_{properties.major}{properties.minor} {properties.total_memory / 2**30:.1f} GiB, "
            f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES={visible}), "
            f"torch {torch.__version__} CUDA {torch.version.cuda}"
        )
        return Outcome("PASS", detail, {"name": properties.name, "visible": visible, "count": torch.cuda.device_count()})
    backends = variant_backends()
    detail = f"{device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}; " + "; ".join(
        f"{k}: {v}" for k, v in backends.items()
    )
    return Outcome("PASS", detail[:300], {"backends": backends})


def busy_wait(seconds: float) -> None:
    """Spin (no sleep) until time.monotonic has advanced `seconds`: a CPU call of known length."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def check_timer(context: Context) -> Outcome:
    """CPU: perf_counter_ns times a 10 ms busy wait as 10-15 ms. CUDA: CUDA-event times of a train of
    matmuls lie within the synchronised wall time of the same calls, and double with twice the matmuls."""
    repeats = 5 if context.quick else 15
    settings = measure.TimingSettings(warmup=1, min_repeats=repeats, max_repeats=repeats, min_time_s=0.0)
    if context.device.type != "cuda":
        known_ms = 10.0
        timing = measure.time_callable(partial(busy_wait, known_ms / 1e3), context.device, settings)
        data = {"timer": timing.timer, "known_ms": known_ms, "median_ms": timing.median_ms, "min_ms": timing.min_ms}
        detail = f"{timing.timer}: {known_ms:g} ms busy wait timed {timing.min_ms:.2f}-{timing.median_ms:.2f} ms (min-median)"
        ok = timing.timer == "perf_counter_ns" and known_ms <= timing.min_ms and timing.median_ms <= 1.5 * known_ms
        return Outcome("PASS" if ok else "FAIL", detail + ("" if ok else f"; expected {known_ms:g}-{1.5 * known_ms:g} ms"), data)
    return cuda_timer(context.device, settings)


def cuda_timer(device: torch.device, settings: measure.TimingSettings) -> Outcome:
    a = torch.randn(2048, 2048, device=device)
    b, c = torch.randn_like(a), torch.empty_like(a)

    def matmuls(n: int) -> None:
        for _ in range(n):
            torch.mm(a, b, out=c)

    count = 1
    while count < 4096 and measure.time_callable(partial(matmuls, count), device, settings).median_ms < 10.0:
        count *= 2  # a train of >= 10 ms, so launch gaps are a small part of it
    single = measure.time_callable(partial(matmuls, count), device, settings)
    double = measure.time_callable(partial(matmuls, 2 * count), device, settings)
    walls = []
    for _ in range(settings.min_repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        matmuls(count)
        torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - start) * 1e3)
    wall_ms = sorted(walls)[len(walls) // 2]
    ratio = double.median_ms / single.median_ms
    tflops = 2 * 2048**3 * count / (single.median_ms / 1e3) / 1e12
    data = {
        "timer": single.timer,
        "matmuls": count,
        "event_ms": single.median_ms,
        "wall_ms": wall_ms,
        "double_ratio": ratio,
        "tflops": tflops,
    }
    detail = (
        f"{single.timer}: {count} matmuls 2048^2 {single.median_ms:.2f} ms (wall {wall_ms:.2f} ms, "
        f"{tflops:.1f} TFLOP/s), twice as many x{ratio:.2f}"
    )
    ok = single.timer == "cuda_event" and 0.7 * wall_ms <= single.median_ms <= 1.02 * wall_ms + 0.05 and 1.8 <= ratio <= 2.2
    return Outcome("PASS" if ok else "FAIL", detail + ("" if ok else "; expected events within 70-102% of wall, x1.8-2.2"), data)


def check_peak_memory(context: Context) -> Outcome:
    """The probe reads a known allocation: CUDA allocator peak of 64 MiB kept + 32 MiB transient = 96 MiB
    exactly; CPU VmHWM of 64 MiB written (within +24 MiB of overhead)."""
    device = context.device
    if device.type == "cuda":

        def allocate() -> torch.Tensor:
            transient = torch.empty(32 * MIB, dtype=torch.uint8, device=device)
            kept = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
            del transient
            return kept

        reading = measure.measure_peak_memory(allocate, device)
        ok = abs(reading.peak_mib - 96.0) < 0.5
        detail = f"{reading.method}: 64 MiB kept + 32 MiB transient read {reading.peak_mib:.2f} MiB (expected 96)"
        return Outcome("PASS" if ok else "FAIL", detail, {"peak_mib": reading.peak_mib, "method": reading.method})
    reading = measure.measure_peak_memory(lambda: torch.ones(64 * MIB, dtype=torch.uint8), device)
    detail = f"{reading.method}: 64 MiB written read {reading.peak_mib:.1f} MiB (expected 64-88)"
    data = {"peak_mib": reading.peak_mib, "method": reading.method}
    if reading.peak_mib != reading.peak_mib:
        raise Skip(f"{reading.method}: this kernel cannot reset VmHWM (/proc/self/clear_refs), so no CPU peak is observable")
    return Outcome("PASS" if 64.0 <= reading.peak_mib <= 88.0 else "FAIL", detail, data)


def check_nvml(context: Context) -> Outcome:
    """NVML answers for the device: driver version, SM clock and temperature (as every CUDA run records)."""
    if context.device.type != "cuda":
        snapshot = measure.nvml_snapshot(0)  # must not raise on a machine without a GPU
        raise Skip(f"device {context.device.type}: no GPU to query (nvml_snapshot gave {snapshot or '{}'}); runs with --device cuda")
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as error:  # not installed, or no driver behind it
        raise Skip(f"NVML unavailable ({type(error).__name__}: {first_line(error)}); pip install nvidia-ml-py") from None
    environment = capture_environment(str(context.device))
    snapshot = environment.get("nvml") or {}
    driver = environment.get("gpu_driver")
    missing = [k for k in ("sm_clock_mhz", "temperature_c") if k not in snapshot] + ([] if driver else ["driver"])
    detail = (
        f"driver {driver}, SM {snapshot.get('sm_clock_mhz')}/{snapshot.get('sm_clock_max_mhz')} MHz, "
        f"{snapshot.get('temperature_c')} C, {snapshot.get('power_w')} W"
    )
    data = {"driver": driver, "nvml": snapshot}
    return Outcome("FAIL" if missing else "PASS", detail + (f"; missing {', '.join(missing)}" if missing else ""), data)


# --------------------------------------------------------------------------- the runner: OOM rows, pool, a suite

# The self-check's cells check code paths, not timings: a contended one is not re-measured.
FAST_MEASURE = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "max_time_s": 5.0, "timeout_s": 300.0, "contention_retries": 0}
SMALL_MODEL = {"d_model": 32, "n_heads": 2}


def probe_attention_variant() -> str:
    """A registered attention variant to drive the runner checks: the first one defined in the `variants`
    package (else any) that builds and runs a small forward and backward on the CPU (the suites'
    mode; flex, say, has no CPU backward)."""
    names = variants.available("attention")
    built_in = [n for n in names if variants.spec(n).module_cls.__module__.startswith("variants.")]
    for name in built_in + [n for n in names if n not in built_in]:
        try:
            x = torch.randn(1, 64, SMALL_MODEL["d_model"], requires_grad=True)
            variants.build(name, **SMALL_MODEL)(x).sum().backward()
            return name
        except Exception:  # noqa: BLE001 - unavailable or broken here: try the next one
            continue
    raise Skip("no registered attention variant runs a small forward and backward on the CPU")


def write_suite(
    folder: Path, name: str, device: torch.device, sweep: dict, model: dict | None = None, mode: str = "forward", **measure_settings: Any
) -> Path:
    """A one-variant attention suite file `folder/name.yaml` for `device` (fast measure settings)."""
    suite = {
        "name": name,
        "device": device.type,
        "mode": mode,
        "workload": "attention",
        "model": model or SMALL_MODEL,
        "sweep": sweep,
        "variants": [{"name": probe_attention_variant()}],
        "measure": {**FAST_MEASURE, **measure_settings},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def check_oom(context: Context) -> Outcome:
    """A cell whose inputs (4 GiB) exceed its 0.25 GiB memory limit comes back from its own process as an
    `oom` row, not a crash: on CPU the allocation passes the address-space backstop (RLIMIT_AS) of the
    limit, on CUDA the caching allocator's per-process memory fraction."""
    from harness.suites import load_suite
    from harness.sweep import execute_isolated

    path = write_suite(
        context.workdir / "oom",
        "selfcheck_oom",
        context.device,
        {"seq_len": [2**20], "batch": [1]},
        model={"d_model": 1024, "n_heads": 4},
        memory_limit_gib=0.25,
        timeout_s=120.0,
    )
    row = execute_isolated(load_suite(path).cells()[0], str(context.workdir / "oom"), "oom", "selfcheck")
    message = re.sub(r"\[enforce fail at [^\]]*\] (err == 0\. )?", "", " ".join(str(row.get("message") or "").split()))
    limit = f"limit {row['memory_limit_mib'] / 1024:.3g} GiB" if row.get("memory_limit_mib") else "no memory limit set"
    detail = f"{row['status']} row ({limit}, 4 GiB of inputs): {message[:140]}"
    ok = row["status"] == "oom" and "memory limit" in message
    return Outcome(
        "PASS" if ok else "FAIL",
        detail + ("" if ok else "; expected an oom row naming the memory limit"),
        {"row": {k: row.get(k) for k in ("status", "message", "memory_limit_mib")}},
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
    from harness.results import RunStore
    from harness.suites import load_suite
    from harness.sweep import RunOptions

    on_cuda = context.device.type == "cuda"
    slots = pool_slots(context.device.type, None if on_cuda else 2)
    cells = load_suite(write_suite(context.workdir / "pool", "selfcheck_pool", context.device, {"seq_len": [64], "batch": [1, 2]})).cells()
    store = RunStore(context.workdir / "pool" / "results", "selfcheck_pool", "pool")
    lines: list[str] = []
    rows = run_pool(cells, store, RunOptions(code_version="selfcheck", run_id="pool", print_line=lines.append), slots)
    statuses = [row["status"] for row in rows]
    problems = (
        []
        if statuses == ["ok", "ok"]
        else [
            f"statuses {statuses}: " + "; ".join(first_line(Exception(row.get("message") or "")) for row in rows if row["status"] != "ok")
        ]
    )
    if on_cuda:
        pinned = [slot.get("CUDA_VISIBLE_DEVICES") for slot in slots]
        if pinned != visible_gpus():
            problems.append(f"slots pin {pinned}, visible GPUs are {visible_gpus()}")
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        problems += [f"a cell ran on {row.get('device_name')!r}" for row in rows if row.get("device_name") not in names]
        detail = f"{statuses.count('ok')}/2 cells ok on {len(slots)} slot(s) pinned to CUDA_VISIBLE_DEVICES={','.join(pinned)}"
    else:
        threads = [int(slot[THREADS_ENV]) for slot in slots]
        problems += [
            f"a cell ran with {row.get('threads')} threads, its slot gives {threads[0]}"
            for row in rows
            if row.get("status") == "ok" and row.get("threads") != threads[0]
        ]
        if len(slots) != 2:
            problems.append(f"{len(slots)} slots for --workers 2")
        detail = f"{statuses.count('ok')}/2 cells ok on {len(slots)} slots of {threads[0]} thread(s)"
    data = {"slots": slots, "rows": [{k: row.get(k) for k in ("status", "threads", "device_name")} for row in rows]}
    return Outcome("FAIL" if problems else "PASS", detail + ("; " + "; ".join(problems) if problems else ""), data)


def check_suite(context: Context) -> Outcome:
    """A two-cell suite run end to end (`python -m harness run` in its own process, each cell in its own)
    into a temporary folder, then its report (report.md, index.html, figures)."""
    from harness.report import render_report
    from harness.results import load

    folder = context.workdir / "suite"
    path = write_suite(folder, "selfcheck_suite", context.device, {"seq_len": [64, 128], "batch": [1]}, mode="forward_backward")
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
    statuses = rows["status"].tolist()
    detail = f"{statuses.count('ok')}/2 cells ok, report with {', '.join(documents) or 'no documents'} and {len(figures)} figures"
    ok = statuses == ["ok", "ok"] and len(documents) == 2 and figures
    return Outcome("PASS" if ok else "FAIL", detail, {"statuses": statuses, "figures": figures})


# --------------------------------------------------------------------------- the fixed list, and running it


def causal_word(causal: bool) -> str:
    return "causal" if causal else "bidirectional"


def plan_checks(quick: bool = False) -> list[Check]:
    """The fixed list of checks, in the order they run. --quick leaves out the long and special LSH cases
    and repeats less; the variant list is whatever the registry holds (plugins included)."""
    try:
        names = variants.available()
    except ImportError as error:  # a plugin named in REFORMER_HARNESS_PLUGINS that does not import
        raise SelfcheckError(str(error)) from None
    checks = [
        Check("device", check_device),
        Check("timer", check_timer),
        Check("peak_memory", check_peak_memory),
        Check("nvml", check_nvml),
    ]
    checks += [Check(f"variant/{name}/{dtype}", partial(check_variant, name, dtype)) for name in names for dtype in DTYPES]
    for dtype in DTYPES:
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
        for dtype in DTYPES:
            recompute = LshCase(4, True, save_probs=False, backend="ops")  # the ops path's recomputing backward
            checks.append(Check(f"lsh/recompute/rounds=4/causal/{dtype}", partial(check_lsh, recompute, dtype)))
        checks.append(
            Check(
                "lsh/dup_correction/rounds=4/bidirectional/float32", partial(check_lsh, LshCase(4, False, dup_correction=True), "float32")
            )
        )
    checks += [Check("oom", check_oom), Check("pool", check_pool), Check("suite", check_suite)]
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


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; SelfcheckError for a CUDA device this machine does not have."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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


def run_check(check: Check, context: Context) -> CheckResult:
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
    resolved = resolve_device(device)
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
            summary.results.append(run_check(check, context))
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
    from harness.results import atomic_write_json

    path = out / SUMMARY_FILE
    atomic_write_json(path, summary.as_dict())
    return path
