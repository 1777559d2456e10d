"""`harness selfcheck`: one command that exercises every device path of the harness and says PASS/FAIL/SKIP.

The flow: `run.plan_checks` lists the fixed checks (below), `run.select_checks` keeps those `--only`
names, and `run.run_selfcheck` runs each one (`run.run_one_check`: an `Outcome`, a `Skip`, or an
exception that becomes a FAIL), prints one line `STATUS name  detail  seconds` per check and rewrites
`selfcheck.json` (every result, the environment) under `out` after each. The pieces:

- `framework`: the check, its context, outcome and result, the summary, `SelfcheckError` and `Skip`;
- `references`: comparing a device run with its float64 CPU reference (`tensor_errors`, `judge`,
  tolerances per dtype);
- `variant_checks`: `variant/<name>/<dtype>`: every registered variant (all kinds, peers where
  installed), forward and backward on the device in float32 / bfloat16 / float16 against a float64
  CPU reference with the same weights and inputs (the low-precision values, widened), causal and
  not where the variant takes it;
- `lsh_checks`: `lsh/rounds=<n>/<causal|bidirectional>/<dtype>`: the LSH core (its default backend:
  on CUDA with triton the Triton kernels) with 1/2/4/8 hash rounds, output and gradients against
  float64 with the same rotations (plus, without --quick, a long sequence, and the ops path's
  recomputing backward and dup_correction); `lsh_triton/...`: the same for the Triton kernels
  (backend 'triton'; CUDA only, SKIP elsewhere or without triton);
- `measurement_checks`: `device`, `timer`, `peak_memory`, `nvml`: the measurement machinery;
- `runner_checks`: `oom`, `pool`, `suite`: the cell runner, the pool executor and a suite end to end.

The exit status (`Summary.exit_code`) is 1 when any check FAILs. `SelfcheckError` is unusable input
(CUDA asked for but not available, an `only` pattern that matches nothing, an unwritable `out`).
Only the `harness selfcheck` command (harness.commands.selfcheck) imports this package.
"""

from harness.selfcheck.framework import SelfcheckError
from harness.selfcheck.run import plan_checks, run_selfcheck, select_checks

__all__ = ["SelfcheckError", "plan_checks", "run_selfcheck", "select_checks"]
