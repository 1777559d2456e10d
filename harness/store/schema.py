"""The result-row schema: every column a row can have, the kinds of rows, and which columns say
"the same configuration". The one place a shared column name is spelled; docs/architecture.md
("Result rows") explains the columns, their sources and rules.

A run stores one row per cell (benchmark suites: no `row_type`; quality suites: `row_type` "train")
plus, for some cells, rows of their parts: single rounds of a cell measured in rounds ("round"),
learning-curve points ("curve") and evaluations ("eval") of a training cell. `split(frame)` sorts
a run's rows by kind; `config_key` / `quality_key` are the identity two runs are paired on.

Variant parameters are columns too (`n_hashes`, `bucket_size`, ...): their names are the variants'
(`variants.spec(name).parameters()`), prefixed with VARIANT_PARAM_PREFIX where one clashes with
a model column; they are not listed here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from harness.safe_io import InputFileError, parse_json
from harness.store.files import ResultsError

if TYPE_CHECKING:  # pandas is imported where rows are split, not into cell processes that only need names
    import pandas as pd

# --------------------------------------------------------------------------- identity and bookkeeping

RUN_ID = "run_id"  # text: the run folder's name (e.g. 20261123T121443Z-amd-epyc)
SUITE = "suite"  # text: the suite's name (its file's stem)
KIND = "kind"  # text: the suite kind on quality rows ("quality"); benchmark rows have none
CELL_KEY = "cell_key"  # text: 16 hex of (configuration, code version); parts add "-r<k>", "-step<8 digits>", "-eval-<8 hex>"
CODE_VERSION = "code_version"  # text: git SHA, "+dirty" when the tree was dirty
CONFIG_KEY = "config_key"  # text: 16 hex of the configuration alone (`config_key`)
ROW_TYPE = "row_type"  # text: the row's kind (ROW_KINDS); absent on a benchmark cell's own row
TRAIN_KEY = "train_key"  # text: the cell key of the training cell a train/curve/eval row belongs to
STARTED_AT = "started_at"  # text: ISO 8601 UTC, when the cell (or round) started
RECORDED_AT = "recorded_at"  # text: ISO 8601 UTC, when a curve or eval row was written
CELL_WALL_S = "cell_wall_s"  # s: wall time of the cell, process start and measurement included

# --------------------------------------------------------------------------- configuration

WORKLOAD = "workload"  # text: attention | block | model
MODE = "mode"  # text: forward | forward_backward | train_step
DEVICE = "device"  # text: cpu | cuda
DTYPE = "dtype"  # text: float32 | bfloat16 | float16
SEQ_LEN = "seq_len"  # tokens per sequence
BATCH = "batch"  # sequences per call
TOKENS_PER_BATCH = "tokens_per_batch"  # tokens per call when the suite fixes them (batch = tokens_per_batch / seq_len)
VARIANT = "variant"  # text: registry name of the attention variant (trained with, on quality rows)
VARIANT_LABEL = "variant_label"  # text: display label, e.g. "lsh n_hashes=4"
VARIANT_PARAMS = "variant_params"  # JSON text: the variant's parameters
VARIANT_PARAM_PREFIX = "variant_"  # a variant parameter named like a model column gets this prefix
MODEL_VARIANT = "model_variant"  # text: the model-kind variant a `model` workload builds (absent: ours)
DEFAULT_MODEL_VARIANT = "reformer_lm"
ATTENTION_BACKEND = "attention_backend"  # text: the code that ran the attention core (LSH: triton | cpu_kernel | ops)

# The model's sizes and options: the fields of variants.model.ReformerLMConfig (less attention).
VOCAB_SIZE = "vocab_size"  # symbols
D_MODEL = "d_model"  # features
N_HEADS = "n_heads"
D_FF = "d_ff"  # features of the feed-forward's hidden layer
N_LAYERS = "n_layers"
MAX_SEQ_LEN = "max_seq_len"  # tokens (the position table's length)
RESIDUAL = "residual"  # text: residual variant name (standard | reversible)
FFN_CHUNKS = "ffn_chunks"  # sequence chunks of the feed-forward (1 = unchunked)
ACTIVATION = "activation"  # text: the feed-forward's activation
AXIAL_SHAPE = "axial_shape"  # list of axis lengths of axial position embeddings, or None
CAUSAL = "causal"  # bool
DROPOUT = "dropout"  # probability
MODEL_COLUMNS = (VOCAB_SIZE, D_MODEL, N_HEADS, D_FF, N_LAYERS, MAX_SEQ_LEN, RESIDUAL, FFN_CHUNKS, ACTIVATION, AXIAL_SHAPE, CAUSAL, DROPOUT)

# --------------------------------------------------------------------------- status

STATUS = "status"  # text: one of STATUSES
MESSAGE = "message"  # text: why a cell is not ok (first line the reason), or a probe's failure; "" when ok
STATUS_OK, STATUS_OOM, STATUS_TIMEOUT, STATUS_ERROR, STATUS_SKIPPED = "ok", "oom", "timeout", "error", "skipped"
STATUSES = (STATUS_OK, STATUS_OOM, STATUS_TIMEOUT, STATUS_ERROR, STATUS_SKIPPED)

# --------------------------------------------------------------------------- timing and throughput

TIME_MS_MEDIAN = "time_ms_median"  # ms per call: median of the samples (of the round medians with rounds)
TIME_MS_IQR = "time_ms_iqr"  # ms: p75 - p25 of the samples
TIME_MS_MIN = "time_ms_min"  # ms
TIME_MS_MAX = "time_ms_max"  # ms
TIME_MS_MEAN = "time_ms_mean"  # ms
TIME_MS_SAMPLES = "time_ms_samples"  # list of ms, one per repeat
CPU_TIME_MS_SAMPLES = "cpu_time_ms_samples"  # list of ms of process CPU time, one per repeat (CPU cells)
CPU_TIME_MS_MEDIAN = "cpu_time_ms_median"  # ms
N_REPEATS = "n_repeats"  # timed calls
TIME_NOISY = "time_noisy"  # bool: IQR / median > 0.10
TIMER = "timer"  # text: what measured the cell: cuda_event | perf_counter_ns | cuda_kernels | cuda_graph
THREADS = "threads"  # torch intra-op threads of the cell's process
TOKENS_PER_S = "tokens_per_s"  # tokens / s at the median time
FLOPS = "flops"  # analytic FLOPs of one call (2 per multiply-add; backward 2x forward)
TFLOPS_PER_S = "tflops_per_s"  # 1e12 FLOP / s at the median time
N_PARAMS = "n_params"  # parameters of the built module

# --------------------------------------------------------------------------- memory

PEAK_MEM_MIB = "peak_mem_mib"  # MiB: peak of one call (CUDA allocator, or VmHWM / ru_maxrss above the baseline)
PEAK_RESERVED_MIB = "peak_reserved_mib"  # MiB: CUDA caching allocator's reserved peak
MEM_METHOD = "mem_method"  # text: how the peak was read
PARAM_MEM_MIB = "param_mem_mib"  # MiB: parameters and buffers
GRAD_MEM_MIB = "grad_mem_mib"  # MiB: gradients (allocated at build)
OPTIM_MEM_MIB = "optim_mem_mib"  # MiB: optimizer state (AdamW's, materialised at build)
ACTIVATION_MEM_MIB = "activation_mem_mib"  # MiB: the measured step peak above the persistent state
MEMORY_LIMIT_MIB = "memory_limit_mib"  # MiB: the cell's memory limit

# --------------------------------------------------------------------------- contention (docs/architecture.md)

CPU_SHARE_SAMPLES = "cpu_share_samples"  # list: process CPU time / (wall time x threads), per repeat
CPU_SHARE = "cpu_share"  # their median
OTHER_CPU_CORES = "other_cpu_cores"  # cores: CPU seconds of the rest of the machine per wall second
RUN_CPU_CORES = "run_cpu_cores"  # cores: those of the run's own other processes
OTHER_BUSY_PROCESSES = "other_busy_processes"  # text: "name cores, ..." of the busy other processes
LOAD_AVG_1M = "load_avg_1m"  # the 1-minute load average after the loop
GPU_OTHER_PROCESSES = "gpu_other_processes"  # NVML compute processes other than the cell's
GPU_OTHER_SM_UTIL_PCT = "gpu_other_sm_util_pct"  # %: another pid's highest SM utilisation during the loop
CONTENDED = "contended"  # bool: the timing was disturbed by other load
CONTENTION = "contention"  # text: why ("" when not contended)
CONTENTION_RETRIES_USED = "contention_retries_used"  # re-measurements a contended loop took

# --------------------------------------------------------------------------- rounds

ROUND = "round"  # 1-based round of a round row (or the round that ended a cell)
ROUNDS = "rounds"  # rounds the cell was measured in
ROUND_DRIFT = "round_drift"  # max / min of the round medians - 1
ROUND_MEDIANS_MS = "round_medians_ms"  # list of ms, one per round

# --------------------------------------------------------------------------- compute floor

MATMUL_GFLOPS = "matmul_gflops"  # GFLOP/s of a square matmul in the cell's dtype and threads
MATMUL_N = "matmul_n"  # its size n
FLOOR_S = "floor_s"  # s: flops at that rate
FLOOR_RATIO = "floor_ratio"  # median time per call / floor_s

# --------------------------------------------------------------------------- the cell's environment

DEVICE_NAME = "device_name"  # text: CPU model or GPU name
OPTIONAL_PACKAGES = "optional_packages"  # JSON text: {package: version} of those the cell imported
FLOAT32_MATMUL_PRECISION = "float32_matmul_precision"  # text: highest | high | medium
TF32_CUDA_MATMUL = "tf32_cuda_matmul"  # bool
TF32_CUDNN = "tf32_cudnn"  # bool
DETERMINISTIC_ALGORITHMS = "deterministic_algorithms"  # bool
NVML_BEFORE_PREFIX, NVML_AFTER_PREFIX = "nvml_before_", "nvml_after_"  # + an NVML field: before / after the timing (CUDA)
NVML_FIELDS = (
    "sm_clock_mhz",  # MHz
    "sm_clock_max_mhz",  # MHz
    "mem_clock_mhz",  # MHz
    "temperature_c",  # degrees C
    "power_w",  # W
    "power_limit_w",  # W
    "throttle_reasons",  # NVML clock-event bitmask
)
NVML_COLUMNS = tuple(prefix + name for prefix in (NVML_BEFORE_PREFIX, NVML_AFTER_PREFIX) for name in NVML_FIELDS)

# --------------------------------------------------------------------------- quality: the training cell

TASK = "task"  # text: duplication | bytes | text | images
TASK_PARAMS = "task_params"  # JSON text: the task block
TRAIN_VARIANT = "train_variant"  # text: the label of the attention trained with
TRAIN_STEPS = "train_steps"  # optimizer steps asked for
BATCH_SIZE = "batch_size"  # sequences per micro-batch
GRAD_ACCUM = "grad_accum"  # micro-batches per step
PEAK_LR = "peak_lr"  # the schedule's peak learning rate
SCHEDULE = "schedule"  # text: cosine | inverse_sqrt | constant
SEED = "seed"  # the training seed (weights, data order)
TRAIN_CONFIG = "train_config"  # JSON text: the train block
ROWS_WRITTEN = "rows_written"  # eval rows the cell wrote (train row)
STEP = "step"  # optimizer steps done
TRAIN_WALL_S = "train_wall_s"  # s of training (evaluations and checkpoints included)
FINAL_EVAL_BPD = "final_eval_bpd"  # bits per dim of the final model with its own attention (train row)
FINAL_ACCURACY = "final_accuracy"  # % (train row)
# curve rows
TRAIN_BPD = "train_bpd"  # bits per dim of the training loss since the last point
EVAL_BPD = "eval_bpd"  # bits per dim on the evaluation batches
EVAL_ACCURACY = "eval_accuracy"  # % of scored symbols predicted right (NaN where the task has none)
LR = "lr"  # learning rate of the last step (the train block's `lr` is the schedule's peak: PEAK_LR)
WALL_S = "wall_s"  # s of training so far
TOKENS_SEEN = "tokens_seen"  # input tokens trained on so far
# eval rows
EVAL_VARIANT = "eval_variant"  # text: the label of the attention evaluated with
EVAL_VARIANT_NAME = "eval_variant_name"  # text: its registry name
EVAL_VARIANT_PARAMS = "eval_variant_params"  # JSON text: its parameters
ACCURACY = "accuracy"  # % of scored symbols predicted right (NaN where the task has none)
EVAL_SYMBOLS = "eval_symbols"  # symbols scored
EVAL_WALL_S = "eval_wall_s"  # s of the evaluation
BPD = "bpd"  # bits per dim of runs stored before eval_bpd (the check rules' fallback column)

# --------------------------------------------------------------------------- phases, bytes moved and the roofline (#31)

FORWARD_MS_MEDIAN = "forward_ms_median"  # ms: median forward phase of a repeat (the whole call in mode forward)
FORWARD_MS_IQR = "forward_ms_iqr"  # ms
FORWARD_MS_SAMPLES = "forward_ms_samples"  # list of ms, one per repeat (same repeats as time_ms_samples)
BACKWARD_MS_MEDIAN = "backward_ms_median"  # ms: median backward phase (with the optimizer step in train_step)
BACKWARD_MS_IQR = "backward_ms_iqr"  # ms
BACKWARD_MS_SAMPLES = "backward_ms_samples"  # list of ms, one per repeat
FORWARD_FLOPS = "forward_flops"  # analytic FLOPs of the forward phase
BACKWARD_FLOPS = "backward_flops"  # analytic FLOPs of the backward phase (0 in mode forward)
BYTES = "step_bytes"  # analytic bytes read + written by one call (forward + backward; variants/traffic.py)
FORWARD_BYTES = "forward_bytes"  # of the forward phase
BACKWARD_BYTES = "backward_bytes"  # of the backward phase (with AdamW's state in train_step)
INTENSITY = "intensity"  # FLOP / byte: flops / bytes
GBYTES_PER_S = "gbytes_per_s"  # 1e9 bytes / s at the median time
MEMBW_GBYTES_PER_S = "membw_gbytes_per_s"  # GB/s of a streaming triad in the cell's process (the memory roof)
MEMBW_MIB = "membw_mib"  # MiB: the triad's three buffers together
COMPUTE_FRACTION = "compute_fraction"  # tflops_per_s over the matmul rate (the compute roof)
MEMORY_FRACTION = "memory_fraction"  # gbytes_per_s over the measured bandwidth (the memory roof)
BOUND = "roof_bound"  # text: compute | memory: the roof the cell's intensity puts under it
ROOF_FRACTION = "roof_fraction"  # achieved FLOP/s over min(compute roof, intensity x bandwidth)

# --------------------------------------------------------------------------- row kinds

CELL_ROW = "cell"  # a benchmark cell's own row: stored without a row_type
ROUND_ROW = "round"  # one round of a cell measured in rounds; readers skip it (its cell's row combines them)
TRAIN_ROW = "train"  # a training cell's own row
CURVE_ROW = "curve"  # one learning-curve point of a training cell
EVAL_ROW = "eval"  # the trained model evaluated with one attention
ROW_KINDS = (CELL_ROW, ROUND_ROW, TRAIN_ROW, CURVE_ROW, EVAL_ROW)
KIND_BENCHMARK, KIND_QUALITY = "benchmark", "quality"  # suite kinds (the suite's `kind:`; KIND on quality rows)

_VALUE_PREFIXES = ("STATUS_", "KIND_", "DEFAULT_")  # constants above that are values, not columns
COLUMNS = frozenset(  # every column name: the upper-case text constants above, less values, row kinds and prefixes
    value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, str) and not name.startswith(_VALUE_PREFIXES) and not name.endswith(("_ROW", "_PREFIX"))
) | frozenset(NVML_COLUMNS)

# What the readers require of the values of a column (missing values are always allowed); "error",
# which this code never writes, is held to text where a foreign row has it.
TEXT_COLUMNS = (
    CELL_KEY, STATUS, VARIANT, VARIANT_LABEL, ROW_TYPE, SUITE, RUN_ID, "error", MESSAGE, WORKLOAD, MODE, DEVICE, DTYPE,
    CODE_VERSION, DEVICE_NAME, CONFIG_KEY, TASK, EVAL_VARIANT, TRAIN_VARIANT, CONTENTION, TIMER, MEM_METHOD, RESIDUAL, BOUND,
)  # fmt: skip
NUMERIC_COLUMNS = (
    SEQ_LEN, BATCH, TOKENS_PER_BATCH, TIME_MS_MEDIAN, PEAK_MEM_MIB, ACTIVATION_MEM_MIB, N_REPEATS, STEP, ACCURACY, BPD,
    ROUNDS, ROUND_DRIFT, N_LAYERS, FFN_CHUNKS, D_FF, D_MODEL, N_HEADS,
)  # fmt: skip
FINITE_COLUMNS = (
    SEQ_LEN, BATCH, TOKENS_PER_BATCH, TIME_MS_MEDIAN, PEAK_MEM_MIB, N_REPEATS, ROUNDS, STEP, N_LAYERS, FFN_CHUNKS,
    D_FF, D_MODEL, N_HEADS,
)  # fmt: skip

# --------------------------------------------------------------------------- identity

# With the model columns that differ from the model's defaults, the parsed variant_params and a
# peer model variant, these say "the same benchmark configuration" whatever the code version,
# label, suite name or measure settings (`config_key`).
CONFIG_COLUMNS = (WORKLOAD, MODE, DEVICE, DTYPE, SEQ_LEN, BATCH, TOKENS_PER_BATCH, VARIANT)
# train_config entries that say how a training ran, not what it computes: not part of `quality_key`.
TRAIN_CONFIG_RUN_ONLY = (THREADS, "checkpoint_every", "timeout_s")


def canonical_json(data: Any) -> str:
    """Compact JSON with sorted keys: the text that cell keys and config keys are hashed from."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def plain_value(value: Any) -> Any:
    """A row value as plain JSON-able Python, the same before and after a parquet round trip:
    NaN -> None, numpy scalars/arrays -> Python, integral floats -> int, JSON text -> its value."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        value = value.tolist()
    if isinstance(value, float):
        return None if math.isnan(value) else (int(value) if value.is_integer() else value)
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return plain_value(parse_json(value))
        except ValueError:  # InputFileError too: too deep, not JSON
            return value
    return None if value is dataclasses.MISSING else value


@functools.lru_cache(maxsize=1)
def model_defaults() -> tuple[tuple[str, Any], ...]:
    """(column, default) of every model field (ReformerLMConfig less attention), as plain values."""
    from variants.model import ReformerLMConfig  # imports torch: only when a key is computed

    out = []
    for f in dataclasses.fields(ReformerLMConfig):
        if f.name in ("attention", "attention_params"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append((f.name, plain_value(default)))
    return tuple(out)


def config_key(row: Mapping[str, Any]) -> str:
    """Identity of a benchmark cell's configuration without the code version: first 16 hex of a
    sha256 over CONFIG_COLUMNS, the parsed variant_params and the model columns that differ from
    the model's defaults (so adding a model field with a default keeps existing keys). Works on a
    cell's `to_row()` and on stored rows alike."""
    identity = {column: plain_value(row.get(column)) for column in CONFIG_COLUMNS}
    identity[VARIANT_PARAMS] = plain_value(row.get(VARIANT_PARAMS)) or {}
    for name, default in model_defaults():
        if name in row and plain_value(row[name]) != default:
            identity[f"model.{name}"] = plain_value(row[name])
    model_variant = plain_value(row.get(MODEL_VARIANT))
    if model_variant not in (None, DEFAULT_MODEL_VARIANT):  # a peer LM; ours keeps the keys it always had
        identity[f"model.{MODEL_VARIANT}"] = model_variant
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def quality_key(row: Mapping[str, Any]) -> str:
    """Identity of one evaluation of a training cell (an `eval` row, or the `train` row of a cell
    that failed before evaluating, standing for its own-attention evaluation): `config_key` plus
    the task, the training settings (less TRAIN_CONFIG_RUN_ONLY) and the eval variant. First 16
    hex of a sha256; ResultsError naming the cell when a JSON column cannot be read."""

    def text(name: str, fallback: str) -> Any:
        value = row.get(name)
        return value if isinstance(value, str) and value else row.get(fallback)

    def parsed(name: str, fallback: str = "") -> dict:
        value = text(name, fallback)
        try:
            data = parse_json(value, f"column {name}") if isinstance(value, str) and value else {}
        except InputFileError as error:
            raise ResultsError(f"a row of cell {row.get(CELL_KEY)!r}: {error}") from None
        return data if isinstance(data, dict) else {}

    identity = {
        "config": config_key(row),
        "task": parsed(TASK_PARAMS),
        "train": {k: v for k, v in parsed(TRAIN_CONFIG).items() if k not in TRAIN_CONFIG_RUN_ONLY},
        "eval_variant": text(EVAL_VARIANT_NAME, VARIANT),
        "eval_params": parsed(EVAL_VARIANT_PARAMS, VARIANT_PARAMS),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- split by kind


def row_kinds(frame: pd.DataFrame) -> pd.Series:
    """The kind (ROW_KINDS, or an unknown stored `row_type`) of each row of `frame`, on its index.
    A row without a row_type is a benchmark cell's (CELL_ROW); a frame stored without the column
    at all (older quality runs) is read by its columns: `eval_variant` set -> EVAL_ROW, else `step`
    set -> CURVE_ROW."""
    import pandas as pd

    if ROW_TYPE in frame:
        kinds = frame[ROW_TYPE].astype(object)
        return kinds.where(kinds.notna(), CELL_ROW)
    kinds = pd.Series(CELL_ROW, index=frame.index, dtype=object)
    if STEP in frame:
        kinds = kinds.mask(frame[STEP].notna(), CURVE_ROW)
    if EVAL_VARIANT in frame:
        kinds = kinds.mask(frame[EVAL_VARIANT].notna(), EVAL_ROW)
    return kinds


@dataclass(frozen=True)
class RowsByKind:
    """A run's rows sorted by kind (`split`); every part keeps the frame's index and row order."""

    frame: pd.DataFrame
    kinds: pd.Series

    def of(self, *kinds: str) -> pd.DataFrame:
        """The rows of the given kinds."""
        return self.frame[self.kinds.isin(kinds)]

    @property
    def cells(self) -> pd.DataFrame:
        """Benchmark cells' own rows."""
        return self.of(CELL_ROW)

    @property
    def rounds(self) -> pd.DataFrame:
        return self.of(ROUND_ROW)

    @property
    def trains(self) -> pd.DataFrame:
        """Training cells' own rows."""
        return self.of(TRAIN_ROW)

    @property
    def curves(self) -> pd.DataFrame:
        return self.of(CURVE_ROW)

    @property
    def evals(self) -> pd.DataFrame:
        return self.of(EVAL_ROW)

    @property
    def without_rounds(self) -> pd.DataFrame:
        """Every row but the single rounds: how the report, compare, check and the summary read a run."""
        return self.frame[self.kinds.ne(ROUND_ROW)]

    @property
    def is_quality(self) -> bool:
        """Whether the run trained (any train, curve or eval row)."""
        return bool(self.kinds.isin((TRAIN_ROW, CURVE_ROW, EVAL_ROW)).any())

    @property
    def own_rows(self) -> pd.DataFrame:
        """One row per cell: the training cells' own rows in a quality run, else the benchmark cells'."""
        return self.trains if self.is_quality else self.cells

    @property
    def failed_trains(self) -> pd.DataFrame:
        """Rows of a kind other than cell, round, curve and eval (train rows) whose status is not ok."""
        status = self.frame[STATUS] if STATUS in self.frame else self.kinds.map(lambda _: None)
        return self.frame[~self.kinds.isin((CELL_ROW, ROUND_ROW, CURVE_ROW, EVAL_ROW)) & status.ne(STATUS_OK)]

    @property
    def unevaluated_trains(self) -> pd.DataFrame:
        """Train rows of cells that stored no eval row (they failed before evaluating)."""
        trains, evals = self.trains, self.evals
        return trains[~trains[CELL_KEY].isin(evals[TRAIN_KEY] if TRAIN_KEY in evals else [])]

    def keyed(self) -> pd.DataFrame:
        """The rows two runs are paired on, each with its identity in CONFIG_KEY (a new frame):
        a benchmark run's cell rows keyed by `config_key`; a quality run's eval rows plus the train
        rows of cells that stored no eval row, keyed by `quality_key` (curves are not paired)."""
        import pandas as pd

        if self.is_quality:
            rows = pd.concat([self.evals, self.unevaluated_trains], ignore_index=True)
            rows[CONFIG_KEY] = [quality_key(row) for row in rows.to_dict("records")]
        else:
            rows = self.without_rounds.copy()
            rows[CONFIG_KEY] = [config_key(row) for row in rows.to_dict("records")]
        return rows


def split(frame: pd.DataFrame | Iterable[Mapping[str, Any]]) -> RowsByKind:
    """A run's rows (a DataFrame, or row dicts) sorted by kind: `.cells`, `.rounds`, `.trains`,
    `.curves`, `.evals`, `.without_rounds`, `.own_rows`, `.keyed()` (see RowsByKind)."""
    import pandas as pd

    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    return RowsByKind(frame, row_kinds(frame))
