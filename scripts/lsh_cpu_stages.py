"""Where the fused CPU kernel's time goes: one LSH layer's step taken apart per stage, and A/B of builds.

    python scripts/lsh_cpu_stages.py [--seq-len 16384] [--hashes 1 2 4 8] [--repeats 7]
                                     [--build NAME=CFLAGS_EXTRA ...] [--sections]

The shape of `suites/peers.yaml` (d_model 256, 4 heads of 64, bucket 64, one sequence, non-causal).
Per stage, each called on its own with the inputs the layer would give it: the projections
(in_proj and out_proj, forward and backward), hashing (`lsh_cpu.hash_buckets`), the counting sort,
the kernel's forward with the rounds combined, dY . Y, and the kernel's backward; then the whole
layer's forward + backward, its compute floor (the harness's analytic step FLOPs over the large-GEMM
rate measured in this process) and the chunk-shaped batched matmuls through torch (the ceiling of
what torch/MKL reach on these shapes). With several --build values each stage runs on every build
in turn, interleaved repeat by repeat (A, B, A, B, ...), and the medians and their ratios to the
first build are printed: builds differ only by extra compiler flags (REFORMER_LSH_CPU_CFLAGS_EXTRA,
e.g. `avx2=-mno-avx512f`). Wall time per call, median over the repeats; prints markdown tables.

Each hash count's table ends with the matmul-only lower bound: the projections as measured (torch's
own GEMMs), the chunk matmuls (2 per chunk forward, 4 backward, none recomputed) at the in-cache
batched-matmul rate torch reaches on those shapes, and the hashing matmul at the floor's rate, over
the floor. No implementation of this algorithm whose matmuls run at torch's rates gets below it,
before a single gather, exp or gradient add.

--sections builds every kernel with -DLSH_CPU_PROFILE (so the stage table then times those builds:
a clock read per mark, ~0.5%) and, after the stage table, times the kernel's forward and backward
alone once more per repeat, printing where their time went inside the kernel (gathers, logits,
softmax, with the kept probabilities' streaming store where kept, each matmul, the combination,
the gradient adds): wall ms per call summed over the kernel's threads, and each section's share.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import variants
from harness.measurement import matmul_rate
from harness.workloads import step_flops
from variants.attention import lsh_core, lsh_cpu, lsh_hashing
from variants.attention.full import shared_qk_key_scale


@dataclass
class Build:
    """One kernel build under test: its `lsh_cpu.load_build` state and its KEEP_PROBS setting."""

    state: dict
    keep_probs: bool | None

    def use(self) -> None:
        """Make this build (and its KEEP_PROBS) the kernel in use."""
        lsh_cpu.use_build(self.state)
        lsh_cpu.KEEP_PROBS = self.keep_probs


def load_build(spec: str, sections: bool = False) -> tuple[str, Build]:
    """NAME[:SOURCE]=EXTRA_CFLAGS -> (NAME, that build of SOURCE); sections: with -DLSH_CPU_PROFILE
    (`lsh_cpu.profile_sections`). A NAME ending in -keep / -recompute sets KEEP_PROBS True / False."""
    name, _, extra = spec.partition("=")
    extra = f"{extra} -DLSH_CPU_PROFILE" if sections else extra
    name, _, source = name.partition(":")
    state = lsh_cpu.load_build(Path(source) if source else None, extra)
    if not lsh_cpu.status().startswith("fused C kernel"):
        raise SystemExit(f"build {spec!r}: {lsh_cpu.status()}")
    keep = True if name.endswith("-keep") else False if name.endswith("-recompute") else None
    return name, Build(state, keep)


def timed(fn, clock=time.perf_counter) -> float:
    """Milliseconds fn() took on `clock` (time.perf_counter: wall; time.process_time: CPU of all threads)."""
    start = clock()
    fn()
    return (clock() - start) * 1e3


def layer_stages(seq_len: int, n_hashes: int) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    """The calls of one layer's step as separate closures (inputs prepared once, as the layer would)."""
    config = variants.make_config("lsh", d_model=256, n_heads=4, n_hashes=n_hashes, bucket_size=64)
    module = variants.spec("lsh").module_cls(config)
    module.train()
    torch.manual_seed(0)
    x = torch.randn(1, seq_len, 256, requires_grad=True)
    heads, head_dim, c = 4, 64, 64
    factors = lsh_hashing.bucket_factors(None, seq_len, c)
    rotations = lsh_hashing.draw_rotations(heads, head_dim, n_hashes, sum(factors), seed=1)
    weight = module.in_proj.weight.view(2, heads, head_dim, 256).transpose(0, 1).reshape(512, 256).detach()
    packed = F.linear(x.detach(), weight).view(1, seq_len, heads, 2 * head_dim)
    qk = packed[..., :head_dim].transpose(1, 2)
    table = packed.reshape(-1, 2 * head_dim)
    bh, n_items = heads, n_hashes * seq_len
    state: dict = {}

    def hash_():
        state["buckets"] = lsh_hashing.hash_buckets(qk, n_hashes, factors, rotations).view(bh, n_items)

    def sort():
        n_round = math.prod(factors)
        state["sorted"] = lsh_cpu.sort_items(state["buckets"], n_buckets=n_hashes * n_round, heads=heads, seq_len=seq_len, chunk=c)

    def items() -> lsh_core.SortedItems:
        sort_idx, undo, rows = state["sorted"]
        return lsh_core.SortedItems(
            rows=rows,
            undo=undo,
            sort_idx=sort_idx,
            heads=heads,
            seq_len=seq_len,
            n_hashes=n_hashes,
            chunk=c,
            causal=False,
            save_probs=True,
            chunk_of=None,
            block_elements=lsh_core.CPU_BLOCK_ELEMENTS,
        )

    def forward():
        state["key_scale"] = shared_qk_key_scale(table[:, :head_dim])
        row_max = torch.empty(bh, n_items, 1)
        row_sum = torch.empty_like(row_max)
        probs = torch.empty(bh, n_items, 2 * c) if lsh_cpu.keep_probs() else None
        combined, scale = lsh_core.fused_forward_combining(table, state["key_scale"], items(), probs, row_max, row_sum)
        state.update(combined=combined, scale=scale, probs=probs, row_max=row_max)

    grad = torch.randn(seq_len * heads, head_dim)

    def grad_dot():
        state["grad_dot"] = (grad * state["combined"]).sum(-1, keepdim=True)

    def backward():
        grad_table = torch.zeros_like(table)
        lsh_cpu.backward(
            table,
            state["key_scale"],
            state["sorted"][2],
            chunk=c,
            causal=False,
            **lsh_core.mask_arguments(table.dtype),
            probs=state["probs"],
            row_max=state["row_max"],
            scale=state["scale"],
            grad_out=grad,
            grad_dot=state["grad_dot"],
            grad_table=grad_table,
        )

    def projections():
        xi = x.detach().requires_grad_()
        p = F.linear(xi, weight.detach().requires_grad_())
        y = module.out_proj(p.detach()[..., :256].contiguous().requires_grad_())
        torch.autograd.backward([y, p], [torch.ones_like(y), torch.ones_like(p)])

    def layer():
        out = module(x)
        out.backward(torch.ones_like(out))

    stages = {
        "projections fwd+bwd": projections,
        "hashing": hash_,
        "sort": sort,
        "forward kernel (+ combine)": forward,
        "dY . Y": grad_dot,
        "backward kernel": backward,
        "layer fwd+bwd": layer,
    }
    return stages, module, x


def best_ms(a: torch.Tensor, b: torch.Tensor, calls: int, repeats: int) -> float:
    """Fastest of `repeats` timings of `calls` torch.bmm(a, b, out=...) in a row (warmed up), in ms."""
    out = torch.bmm(a, b)

    def run() -> None:
        for _ in range(calls):
            torch.bmm(a, b, out=out)

    run()
    return min(timed(run) for _ in range(repeats))


def bmm_ceiling(repeats: int) -> list[tuple[str, float]]:
    """GFLOP/s of torch.bmm on the six chunk matmul shapes (64 chunks of c 64, d 64) and of a large mm."""
    g, c, d = 4096, 64, 64
    shapes = {
        "q.k  [c,d]x[d,2c]": ((g, c, d), (g, d, 2 * c)),
        "P@V  [c,2c]x[2c,d]": ((g, c, 2 * c), (g, 2 * c, d)),
        "dV   [2c,c]x[c,d]": ((g, 2 * c, c), (g, c, d)),
        "dP   [c,d]x[d,2c]": ((g, c, d), (g, d, 2 * c)),
        "dQ   [c,2c]x[2c,d]": ((g, c, 2 * c), (g, 2 * c, d)),
        "dK   [2c,c]x[c,d]": ((g, 2 * c, c), (g, c, d)),
    }
    rows = []
    for name, (sa, sb) in shapes.items():
        a, b = torch.randn(*sa), torch.randn(*sb)
        flops = 2 * sa[0] * sa[1] * sa[2] * sb[2]
        rows.append((f"bmm {name}, {g} chunks (operands {a.numel() * 4 * 2 >> 20} MiB)", flops / best_ms(a, b, 1, repeats) / 1e6))
        small = a[:64].contiguous(), b[:64].contiguous()
        rows.append((f"bmm {name}, 64 chunks in cache", flops / g * 64 * 64 / best_ms(*small, 64, repeats) / 1e6))
    n = 2048
    square = torch.randn(1, n, n), torch.randn(1, n, n)
    rows.append((f"mm {n}^3 (the floor's rate)", 2 * n**3 / best_ms(*square, 1, repeats) / 1e6))
    return rows


def in_cache_bmm_rate(repeats: int) -> float:
    """GFLOP/s of torch.bmm on the kernel's chunk shapes with operands in cache (c = d = 64), the mean
    over the six products of `bmm_ceiling`."""
    rows = [gflops for name, gflops in bmm_ceiling(repeats) if "in cache" in name]
    return statistics.mean(rows)


def chunk_matmul_flops(seq_len: int, n_hashes: int, heads: int, c: int, d: int) -> int:
    """FLOPs of the chunk matmuls of one forward + backward, none recomputed: per chunk [c, d] x [d, 2c]
    and [c, 2c] x [2c, d] forward, four such products backward."""
    chunks = heads * n_hashes * seq_len // c
    return chunks * 6 * 2 * c * 2 * c * d


def print_sections(builds: list[str], sections: dict[str, list[dict[str, float]]]) -> None:
    """Markdown: a row per kernel section, the median over repeats of its ms per call (summed over
    threads) and its share of its pass (forward or backward), per build."""
    names = list(sections[builds[0]][0])
    print("\n| section | " + " | ".join(f"{b} ms | share" for b in builds) + " |")
    print("|---" * (1 + 2 * len(builds)) + "|")
    for name in names:
        cells = []
        for build in builds:
            medians = {n: statistics.median(r[n] for r in sections[build]) for n in names}
            pass_total = sum(v for n, v in medians.items() if n.split()[0] == name.split()[0])
            cells.append(f"{medians[name]:.1f} | {medians[name] / pass_total:.0%}" if pass_total else "0 | -")
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_table(builds: list[str], medians: dict[str, list[float]], floor_ms: float, cpu_share: list[float]) -> None:
    """Markdown: a row per stage (median ms per build, then each build over the first), the layer's
    floor ratio and CPU share."""
    print("| stage | " + " | ".join(builds) + "".join(f" | {n} / {builds[0]}" for n in builds[1:]) + " |")
    print("|---" * (2 * len(builds)) + "|")
    for stage, values in medians.items():
        ratios = "".join(f" | {v / values[0]:.3f}" for v in values[1:])
        print(f"| {stage} | " + " | ".join(f"{v:.1f}" for v in values) + ratios + " |")
    blank = " |" * (len(builds) - 1)
    print("| floor ratio of the layer | " + " | ".join(f"{v / floor_ms:.2f}" for v in medians["layer fwd+bwd"]) + " |" + blank)
    print("| CPU share of the layer | " + " | ".join(f"{v:.2f}" for v in cpu_share) + " |" + blank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--hashes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--build",
        action="append",
        default=[],
        help="NAME[:SOURCE]=EXTRA_CFLAGS: a build of SOURCE (default lsh_cpu.c) with extra flags (repeatable); "
        "a NAME ending in -keep / -recompute sets lsh_cpu.KEEP_PROBS True / False (else the kernel's default)",
    )
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time (all threads) instead of wall time per stage")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the batched-matmul table")
    parser.add_argument("--sections", action="store_true", help="profile builds: where the kernel's time goes inside it")
    args = parser.parse_args()
    states = dict(load_build(spec, args.sections) for spec in args.build or ["default="])
    builds = list(states)
    print(f"threads {torch.get_num_threads()}; builds: " + "; ".join(f"{n}: {b.state['status']}" for n, b in states.items()))
    for n_hashes in args.hashes:
        stages, module, x = layer_stages(args.seq_len, n_hashes)
        samples = {(name, stage): [] for name in builds for stage in stages}
        cpu = {name: [] for name in builds}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, build in states.items():
                build.use()
                for stage, fn in stages.items():
                    start_cpu, start = time.process_time(), time.perf_counter()
                    fn()
                    cpu_ms, ms = (time.process_time() - start_cpu) * 1e3, (time.perf_counter() - start) * 1e3
                    if repeat and stage == "layer fwd+bwd":
                        cpu[name].append(cpu_ms / ms / torch.get_num_threads())
                    if repeat:
                        samples[(name, stage)].append(cpu_ms if args.cpu_time else ms)
        rate = matmul_rate("cpu")
        floor_ms = step_flops(module, 1, args.seq_len, "forward_backward") / (rate * 1e9) * 1e3
        clock = "CPU" if args.cpu_time else "wall"
        print(f"\n## {n_hashes} hashes, {args.seq_len} tokens: median {clock} ms of {args.repeats}", end=" ")
        print(f"(matmul {rate:.0f} GFLOP/s, floor {floor_ms:.0f} ms)\n")
        medians = {stage: [statistics.median(samples[(n, stage)]) for n in builds] for stage in stages}
        print_table(builds, medians, floor_ms, [statistics.median(cpu[n]) for n in builds])
        bmm_rate = in_cache_bmm_rate(3)
        config = module.config
        chunks_ms = chunk_matmul_flops(args.seq_len, n_hashes, config.n_heads, config.bucket_size, config.head_dim) / (bmm_rate * 1e9) * 1e3
        hashing_ms = module.no_backward_flops(1, args.seq_len) / (rate * 1e9) * 1e3
        for name in builds:
            projections_ms = medians["projections fwd+bwd"][builds.index(name)]
            bound_ms = projections_ms + chunks_ms + hashing_ms
            print(
                f"\n{name}: matmul-only lower bound {bound_ms:.0f} ms = {bound_ms / floor_ms:.2f}x the floor: projections "
                f"{projections_ms:.0f} ms as measured, chunk matmuls {chunks_ms:.0f} ms at the in-cache bmm rate "
                f"{bmm_rate:.0f} GFLOP/s, hashing matmul {hashing_ms:.1f} ms at the floor's rate"
            )
        if args.sections:
            sections = {name: [] for name in builds}
            for repeat in range(args.repeats + 1):
                for name, build in states.items():
                    build.use()
                    lsh_cpu.profile_sections()  # zero what the stage table left
                    stages["forward kernel (+ combine)"]()
                    stages["dY . Y"]()
                    stages["backward kernel"]()
                    if repeat:
                        sections[name].append(lsh_cpu.profile_sections())
            print_sections(builds, sections)
        del module, x
    if not args.no_ceiling:
        print("\n## Chunk-shaped matmuls through torch (best of repeats)\n\n| shape | GFLOP/s |\n|---|---|")
        for name, gflops in bmm_ceiling(args.repeats):
            print(f"| {name} | {gflops:.1f} |")


if __name__ == "__main__":
    main()
