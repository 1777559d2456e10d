#!/usr/bin/env bash
# Everything a short GPU lease should produce, in one call of at most ~9.5 minutes (docs/benchmarks.md):
#   1. preflight: python, torch, the GPU (nvidia-smi -q, harness env: numerics / TF32, NVML clock lock)
#   2. harness selfcheck --device cuda (every CUDA path, full list)          budget  90 s
#   3. suites/ci_gpu.yaml, its check against results/baselines/<gpu>/ci_gpu
#      (or, for a GPU without one, a candidate baseline to commit), report   budget  60 s + 20 s + 20 s
#   4. suites/lsh_kernel.yaml (LSH's Triton kernels vs ops vs SDPA flash / efficient, bf16, 4K-128K,
#      30 cells), its targets (harness check --targets), report, and
#      harness profile of its 32K LSH-8 Triton cell (the lsh/* stage shares) budget 160 s + 20 s + 20 s + 25 s
#   5. suites/seq_length.yaml on CUDA at 32K (6 cells: LSH on its default
#      backend, Triton where installed), report (forward / backward split,
#      roofline with both roofs measured)                                    budget  45 s + 20 s
#   6. the same 6 cells with measure.timer=kernels, compared with step 5,
#      and their report                                                      budget  50 s + 20 s + 20 s
#      (the selfcheck of step 2 has `gpu_timers`: events vs kernels vs graphs on a matmul train)
# (suites/peers.yaml, ~100 s, left out for the kernel step: run it alone on a lease of its own.)
# Each step runs under `timeout` within an overall deadline (LEASE_SECONDS, default 560: steps that
# would pass it get less, or are skipped); a suite cut short keeps its finished cells, which still get
# their report. Everything goes under one folder:
#   OUT_DIR/{summary.txt,steps.tsv,logs/,selfcheck/,results/,check/,reports/,env.txt,nvidia-smi.txt}
#
# Usage:
#   scripts/gpu-lease.sh [OUT_DIR]            # default OUT_DIR: $OUT (a lent machine's return folder),
#                                             # else results/_scratch/gpu-lease-<UTC time>
#   scripts/gpu-lease.sh --dry-run [OUT_DIR]  # (or DRY_RUN=1) on any machine, CPU included: shows every
#                                             # step, lists the selfcheck's checks, --dry-runs the suites
# Environment: PYTHON (default .venv/bin/python, else python3), LEASE_SECONDS, and on a copy of the tree
# without git history REFORMER_HARNESS_CODE_VERSION=<sha> so the runs record which code they measured.
# Exit status: 0 when every step succeeded, 1 otherwise (steps.tsv says which), 2 when python/torch/CUDA
# are not usable here (nothing else runs).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$DRY_RUN" = 1 ]; then DEFAULT_OUT="results/_scratch/gpu-lease-dry-run-$STAMP"; else DEFAULT_OUT="${OUT:-results/_scratch/gpu-lease-$STAMP}"; fi
LEASE_OUT="${1:-$DEFAULT_OUT}"
LEASE_SECONDS="${LEASE_SECONDS:-560}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "${REFORMER_VENV:-.venv}/bin/python" ]; then PY="${REFORMER_VENV:-.venv}/bin/python"; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # harness importable without an install
RESULTS="$LEASE_OUT/results"
mkdir -p "$LEASE_OUT/logs" "$LEASE_OUT/check" "$LEASE_OUT/reports"
START=$(date +%s)
STEPS="$LEASE_OUT/steps.tsv"
printf 'step\texit\tseconds\tbudget_s\n' > "$STEPS"
FAILED=0

say() { echo "[lease $(( $(date +%s) - START ))s] $*" | tee -a "$LEASE_OUT/summary.txt"; }

# budget WANTED: seconds a step may take, leaving 15 s of the deadline for the summary (0: no time left).
budget() {
    local left=$(( LEASE_SECONDS - ( $(date +%s) - START ) - 15 ))
    if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# step NAME WANTED_SECONDS COMMAND...: run under timeout, log to logs/NAME.txt, record exit and seconds.
step() {
    local name="$1" wanted="$2"; shift 2
    local seconds; seconds=$(budget "$wanted")
    local log="$LEASE_OUT/logs/$name.txt"
    if [ "$seconds" = 0 ]; then
        say "$name: SKIPPED, no time left of LEASE_SECONDS=$LEASE_SECONDS"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$STEPS"; FAILED=1; return 0
    fi
    say "$name (up to ${seconds}s): $*"
    local begin; begin=$(date +%s)
    local status=0
    timeout --signal=TERM --kill-after=20 "$seconds" "$@" > "$log" 2>&1 || status=$?
    local took=$(( $(date +%s) - begin ))
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$seconds" >> "$STEPS"
    tail -n 3 "$log" | sed 's/^/    /'
    if [ "$status" != 0 ]; then
        FAILED=1
        say "$name: exit $status after ${took}s$([ "$status" = 124 ] && echo ' (stopped at its budget; a suite keeps its finished cells)')"
    fi
    return 0
}

# planned NAME COMMAND...: in a dry run, show a step that needs real results, without running it.
planned() { local name="$1"; shift; say "$name (not run in a dry run): $*"; }

# --------------------------------------------------------------------------- 1. preflight
if ! "$PY" -c "import torch, harness" > "$LEASE_OUT/logs/preflight.txt" 2>&1; then
    say "preflight: $PY cannot import torch and harness:"; cat "$LEASE_OUT/logs/preflight.txt"; exit 2
fi
say "preflight: $("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)")')"
if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "preflight: CUDA is not available to $PY (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}); nothing run. Use --dry-run off a GPU."
    exit 2
fi
command -v nvidia-smi > /dev/null && nvidia-smi -q > "$LEASE_OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -m harness env --device "$([ "$DRY_RUN" = 1 ] && echo auto || echo cuda)" > "$LEASE_OUT/env.txt" 2>&1 || true
# The settings that change numbers (float32 matmul precision / TF32, NVML's clock lock, CPU governor): in the summary.
say "settings: $(grep -E '^(numerics|gpu_clocks|cpu_frequency)' "$LEASE_OUT/env.txt" | tr -s ' ' | paste -sd ';' - || true)"

# --------------------------------------------------------------------------- 2. selfcheck
if [ "$DRY_RUN" = 1 ]; then
    step selfcheck 60 "$PY" -m harness selfcheck --device cuda --list
    say "selfcheck: $(wc -l < "$LEASE_OUT/logs/selfcheck.txt") checks would run on cuda (the list is in logs/selfcheck.txt)"
else
    step selfcheck 90 "$PY" -m harness selfcheck --device cuda --out "$LEASE_OUT/selfcheck"
    grep -E '^(FAIL|SKIP) ' "$LEASE_OUT/logs/selfcheck.txt" | cut -c1-220 | sed 's/^/    /' || true
fi

# --------------------------------------------------------------------------- 3-5. suites on CUDA
# suite NAME WANTED_SECONDS [run options...]: run a suite on CUDA into $RESULTS (a dry run lists its cells).
suite() {
    local name="$1" wanted="$2"; shift 2
    if [ "$DRY_RUN" = 1 ]; then
        step "$name" 60 "$PY" -m harness run "suites/$name.yaml" --device cuda --dry-run "$@"
        say "$name: a real lease gives it up to ${wanted}s"
    else
        step "$name" "$wanted" "$PY" -m harness run "suites/$name.yaml" --device cuda --out "$RESULTS" "$@"
    fi
}

# report NAME: figures and report.md of the suite's latest run under $RESULTS.
report() {
    if [ "$DRY_RUN" = 1 ]; then planned "report-$1" "$PY" -m harness report "$RESULTS/$1" --out "$LEASE_OUT/reports/$1"; return 0; fi
    [ -d "$RESULTS/$1" ] || { say "report-$1: no results to report"; return 0; }
    step "report-$1" 20 "$PY" -m harness report "$RESULTS/$1" --out "$LEASE_OUT/reports/$1"
}

suite ci_gpu 60
SLUG="$("$PY" -c "from harness.environment import device_name, device_slug; print(device_slug(device_name('cuda')))" 2>/dev/null || echo unknown)"
BASELINE="results/baselines/$SLUG/ci_gpu"
if [ "$DRY_RUN" = 1 ]; then
    planned check-ci_gpu "$PY" -m harness check "$RESULTS/ci_gpu" --baseline "results/baselines/<gpu slug>/ci_gpu" "(or, without one: harness baseline ... --root $RESULTS)"
elif [ -f "$BASELINE/run.json" ]; then
    step check-ci_gpu 20 "$PY" -m harness check "$RESULTS/ci_gpu" --baseline "$BASELINE"
    cp "$LEASE_OUT/logs/check-ci_gpu.txt" "$LEASE_OUT/check/check.txt"
    "$PY" -m harness check "$RESULTS/ci_gpu" --baseline "$BASELINE" --format json > "$LEASE_OUT/check/check.json" 2>/dev/null || true
    "$PY" -m harness check "$RESULTS/ci_gpu" --baseline "$BASELINE" --format markdown > "$LEASE_OUT/check/check.md" 2>/dev/null || true
elif [ -d "$RESULTS/ci_gpu" ]; then
    say "check-ci_gpu: no baseline for this GPU ($BASELINE); promoting this run as a candidate (review, then copy to $BASELINE and commit)"
    step baseline-ci_gpu 20 "$PY" -m harness baseline "$RESULTS/ci_gpu" --name ci_gpu --root "$RESULTS" --force
fi
report ci_gpu

# LSH attention's Triton kernels against its ops path and SDPA's kernels, and issue 30's targets.
suite lsh_kernel 160
if [ "$DRY_RUN" = 1 ]; then
    planned targets-lsh_kernel "$PY" -m harness check "$RESULTS/lsh_kernel" --targets
elif [ -d "$RESULTS/lsh_kernel" ]; then
    step targets-lsh_kernel 20 "$PY" -m harness check "$RESULTS/lsh_kernel" --targets
    cp "$LEASE_OUT/logs/targets-lsh_kernel.txt" "$LEASE_OUT/check/lsh_kernel-targets.txt"
fi
report lsh_kernel
KERNEL_CELL="variant == 'lsh' and backend == 'triton' and n_hashes == 8 and seq_len == 32768"
if [ "$DRY_RUN" = 1 ]; then
    planned profile-lsh_kernel "$PY" -m harness profile suites/lsh_kernel.yaml --device cuda --filter "\"$KERNEL_CELL\"" --steps 3
else
    step profile-lsh_kernel 25 "$PY" -m harness profile suites/lsh_kernel.yaml --device cuda --filter "$KERNEL_CELL" --steps 3
fi

# Figure 5's longest length only (the full 36 cells need ~170 s): LSH on its default backend.
suite seq_length 45 --filter "seq_len == 32768"
report seq_length

# 6. The same cells timed with measure.timer kernels (device kernel time from torch.profiler: launch
# gaps and host overhead left out) beside the events run above, and `harness compare` of the two:
# the gap between the timers per cell (docs/performance.md, "Where the time goes").
KERNELS="$RESULTS/timer-kernels"
if [ "$DRY_RUN" = 1 ]; then
    step seq_length-kernels 60 "$PY" -m harness run suites/seq_length.yaml --device cuda --dry-run --filter "seq_len == 32768" --set measure.timer=kernels
    planned compare-timers "$PY" -m harness compare "$RESULTS/seq_length" "$KERNELS/seq_length" --out "$LEASE_OUT/reports/compare-timers"
else
    step seq_length-kernels 50 "$PY" -m harness run suites/seq_length.yaml --device cuda --out "$KERNELS" --filter "seq_len == 32768" --set measure.timer=kernels
    if [ -d "$RESULTS/seq_length" ] && [ -d "$KERNELS/seq_length" ]; then
        step compare-timers 20 "$PY" -m harness compare "$RESULTS/seq_length" "$KERNELS/seq_length" --out "$LEASE_OUT/reports/compare-timers"
        step report-seq_length-kernels 20 "$PY" -m harness report "$KERNELS/seq_length" --out "$LEASE_OUT/reports/seq_length-kernels"
    fi
fi

# --------------------------------------------------------------------------- summary
say "done in $(( $(date +%s) - START ))s -> $LEASE_OUT"
column -t -s $'\t' "$STEPS" 2>/dev/null | tee -a "$LEASE_OUT/summary.txt" || cat "$STEPS"
exit "$FAILED"
