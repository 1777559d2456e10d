"""Train and evaluate a ReformerLM in bits per dim: schedules, the loop, evaluation, checkpoints.

    model = build_model({"d_model": 128, "n_layers": 1, ...}, "lsh", {"n_hashes": 2, "bucket_size": 16})
    curve = train(model, data, TrainConfig(steps=600, lr=3e-3), checkpoint="run/ckpt.pt", record=print)
    evaluate(model_with_other_attention(model, "full", {"shared_qk": True}), data, EvalConfig())

Determinism: with the same seeds, thread count and device, a run interrupted at a checkpoint and
resumed produces the same numbers as an uninterrupted one. The checkpoint holds the model, AdamW,
the step, torch's global RNG (LSH rotations, dropout), the data generator and the partial averages.
Evaluation runs under `torch.random.fork_rng` from its own seed, so it never disturbs training's
random streams and its numbers depend only on the weights.

Units: `*_bpd` are bits per scored symbol (mean cross-entropy in nats / ln 2); accuracies are
percent (0-100) of scored symbols whose arg-max prediction is right; `wall_s` seconds of training
(evaluation and checkpointing included, time before a resume carried over); `tokens_seen` input
tokens consumed by training steps (batch * seq_len * accumulation per step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from harness.data import Batch, LMData
from harness.safe_io import InputFileError, check_regular
from harness.store.schema import ACCURACY, BATCH_SIZE, BPD, EVAL_ACCURACY, EVAL_BPD, GRAD_ACCUM, LR, STEP, TOKENS_SEEN, TRAIN_BPD, WALL_S
from variants.model import ReformerLM, ReformerLMConfig, bits_per_dim

Schedule = Literal["cosine", "inverse_sqrt", "constant"]


@dataclass
class TrainConfig:
    """Optimisation settings.

    steps: optimizer steps; batch_size: sequences per micro-batch; grad_accum: micro-batches per
    step (effective batch = batch_size * grad_accum); lr: peak learning rate after `warmup_steps`
    of linear warm-up, then `schedule` (cosine to lr * min_lr_ratio at `steps`, inverse square
    root, or constant); AdamW with `betas`, `weight_decay`; gradients clipped to global norm
    `grad_clip` (None = off). seed: model init, data order and LSH rotations. eval_every: steps
    between learning-curve points (also at step 0 and the last step); checkpoint_every: steps
    between checkpoints (0 = only at the end).
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 0

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        for name in ("steps", BATCH_SIZE, GRAD_ACCUM, "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps and checkpoint_every must be >= 0")
        for name in (LR, "min_lr_ratio", "weight_decay", *(("grad_clip",) if self.grad_clip is not None else ())):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not all(math.isfinite(beta) and 0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "inverse_sqrt", "constant"):
            raise ValueError(f"schedule must be cosine, inverse_sqrt or constant, got {self.schedule!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass
class EvalConfig:
    """batches x batch_size sequences of `split`, drawn from a generator seeded with `seed`
    (the same sequences every evaluation); LSH rotations drawn from torch's RNG seeded likewise."""

    batches: int = 4
    batch_size: int = 32
    split: str = "valid"
    seed: int = 1234


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Learning-rate factor (times config.lr) for optimizer step `step` (0-based).

    Linear warm-up (step + 1) / warmup_steps, then cosine from 1 to min_lr_ratio at `steps`,
    or sqrt(warmup_steps / (step + 1)) (inverse_sqrt), or 1 (constant).
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- models


def training_model_config(model: dict[str, Any], attention: str, attention_params: dict[str, Any]) -> ReformerLMConfig:
    """The validated ReformerLMConfig a training cell trains: its model settings plus one attention
    variant and its params (every layer). A benchmark cell's: `harness.workloads.workload_model_config`."""
    config = ReformerLMConfig(**model, attention=attention, attention_params={attention: dict(attention_params)})
    config.validate()
    return config


def build_model(model: dict[str, Any], attention: str, attention_params: dict[str, Any], seed: int | None = None) -> ReformerLM:
    """ReformerLM with every layer using `attention` (a registered attention variant) and its params;
    with `seed`, its initial weights are drawn under torch.manual_seed(seed) (same seed, same weights)."""
    config = training_model_config(model, attention, attention_params)
    if seed is None:
        return ReformerLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ReformerLM(config)


def with_attention(trained: ReformerLM, attention: str, attention_params: dict[str, Any]) -> ReformerLM:
    """A copy of `trained` whose layers use another attention configuration (paper Table 2).

    The new model is built from the same model settings and loads `trained`'s state dict strictly:
    full attention with shared_qk=True and LSH attention both have one fused `in_proj` of
    [2 * d_model, d_model] (qk and v) and an `out_proj`, so their weights are interchangeable;
    full attention with separate QK ([3 * d_model, d_model]) is not, and raises ValueError.
    """
    settings = {
        f.name: getattr(trained.config, f.name)
        for f in dataclasses.fields(trained.config)
        if f.name not in ("attention", "attention_params")
    }
    model = build_model(settings, attention, attention_params)
    try:
        model.load_state_dict(trained.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"the trained weights do not fit attention {attention!r} {attention_params}: {error}") from None
    return model.to(next(trained.parameters()).device)


# --------------------------------------------------------------------------- evaluation


def batch_metrics(logits: torch.Tensor, batch: Batch) -> tuple[float, float, int]:
    """(summed bits, correct arg-max predictions, scored symbols) of next-token logits
    [batch, seq_len, vocab] on `batch` (position t predicts token t + 1)."""
    targets = batch.tokens[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if batch.mask is None else batch.mask[:, 1:].bool()
    count = int(mask.sum())
    bits = float(bits_per_dim(logits[:, :-1], targets, mask)) * count
    correct = float(((logits[:, :-1].argmax(-1) == targets) & mask).sum())
    return bits, correct, count


@torch.no_grad()
def evaluate(model: nn.Module, data: LMData, config: EvalConfig, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"bpd": bits per scored symbol, "accuracy": percent (NaN unless data.has_accuracy), "symbols": n}.

    Runs in eval mode under fork_rng seeded with config.seed, so the caller's RNG is untouched and
    the same weights always give the same numbers.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed)
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    bits = correct = count = 0.0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        for _ in range(config.batches):
            batch = data.sample(config.split, config.batch_size, generator).to(device)
            b, c, n = batch_metrics(model(batch.tokens), batch)
            bits, correct, count = bits + b, correct + c, count + n
    model.train(was_training)
    accuracy = 100.0 * correct / count if data.has_accuracy else math.nan
    return {BPD: bits / count, ACCURACY: accuracy, "symbols": count}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as data (not a regular file, too large, a pickle
    that would run code or build objects other than tensors and plain containers)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint` (loaded on CPU). Loaded with `weights_only=True`: only
    tensors, numbers, strings and plain containers are rebuilt, so a checkpoint someone sends cannot
    run code (a pickle gadget is refused); CheckpointError naming the file otherwise."""
    try:
        check_regular(path, "checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler met a global (a class, a function)
        found = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        found = found.split(" was not an allowed global")[0]  # not torch's advice to allow it
        raise CheckpointError(
            f"{path}: cannot load checkpoint: it holds objects other than tensors, numbers, strings and plain containers, "
            f"and a checkpoint is never allowed to run code ({found or type(error).__name__})"
        ) from None
    except (InputFileError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a checkpoint holds a dict, got {type(state).__name__}")
    return state


def slim_checkpoint(path: str | Path) -> None:
    """Drop the optimizer state from a finished run's checkpoint (a third of its size remains):
    the weights, RNG states and curve stay, enough to evaluate or to re-load the finished run."""
    state = load_checkpoint(path)
    if state.pop("optimizer", None) is not None:
        save_checkpoint(path, state)


def _restore(
    path: str | Path,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[_Progress, list[dict[str, Any]]]:
    """Put a checkpoint's model, optimizer and RNG states back; (progress, curve) of it.
    CheckpointError naming the file when its contents do not fit (a hand-made or foreign file)."""
    try:
        model.load_state_dict(state["model"])
        if "optimizer" in state:  # absent from the slimmed checkpoint of a finished run
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        return _Progress(**state["progress"]), [dict(point) for point in state["curve"]]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: checkpoint does not fit this model ({type(error).__name__}: {str(error)[:300]}); remove it to train afresh"
        ) from None


def _fingerprint(model: ReformerLM, config: TrainConfig) -> dict[str, Any]:
    return {"model": dataclasses.asdict(model.config), "train": dataclasses.asdict(config)}


# --------------------------------------------------------------------------- training


@dataclass
class _Progress:
    step: int = 0
    tokens_seen: int = 0
    wall_s: float = 0.0
    bits_sum: float = 0.0  # summed train bpd of the steps since the last curve point
    bits_steps: int = 0


def train(
    model: ReformerLM,
    data: LMData,
    config: TrainConfig,
    eval_config: EvalConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    record: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Train `model` on `data` (its "train" split) and return the learning curve.

    Build the model with `build_model(..., seed=config.seed)` so that the same settings always
    train the same way: data order and torch's global RNG are seeded from config.seed here.
    Curve points, at step 0, every eval_every steps and at the last step, are dicts with `step`,
    `train_bpd` (mean of the training steps since the previous point; NaN at step 0), `eval_bpd`,
    `eval_accuracy` (percent; NaN where the task defines none), `lr` (of the last step), `wall_s`
    (seconds of training and earlier evaluations so far), `tokens_seen`;
    each is passed to `record` as soon as it is measured.

    checkpoint: a file; when it exists and was written for the same model and train settings,
    training resumes from it (same numbers as an uninterrupted run); it is rewritten every
    checkpoint_every steps and at the end. stop_after: return after that many steps (in total),
    as if interrupted, after checkpointing (for tests and time-boxed runs). eval_config: None ->
    EvalConfig()'s defaults.
    """
    config.validate()
    eval_config = eval_config if eval_config is not None else EvalConfig()
    device = torch.device(device)
    torch.manual_seed(config.seed + 2)  # LSH rotations and dropout; the weights come from build_model's seed
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    progress = _Progress()
    curve: list[dict[str, Any]] = []
    fingerprint = _fingerprint(model, config)
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if state.get("fingerprint") == fingerprint:
            progress, curve = _restore(checkpoint, state, model, optimizer, generator, device)

    def save() -> None:
        if checkpoint is None:
            return
        save_checkpoint(
            checkpoint,
            {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data_rng": generator.get_state(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "progress": dataclasses.asdict(progress),
                "curve": curve,
            },
        )

    def point(lr: float) -> None:
        metrics = evaluate(model, data, eval_config, device)
        row = {
            STEP: progress.step,
            TRAIN_BPD: progress.bits_sum / progress.bits_steps if progress.bits_steps else math.nan,
            EVAL_BPD: metrics[BPD],
            EVAL_ACCURACY: metrics[ACCURACY],
            LR: lr,
            WALL_S: progress.wall_s,
            TOKENS_SEEN: progress.tokens_seen,
        }
        progress.bits_sum, progress.bits_steps = 0.0, 0
        curve.append(row)
        if record is not None:
            record(dict(row))

    def timed_point(lr: float) -> None:
        started = time.perf_counter()
        point(lr)
        progress.wall_s += time.perf_counter() - started

    if not curve:
        timed_point(config.lr * lr_multiplier(0, config))
    last = min(config.steps, stop_after) if stop_after is not None else config.steps
    while progress.step < last:
        started = time.perf_counter()
        lr = config.lr * lr_multiplier(progress.step, config)
        for group in optimizer.param_groups:
            group.update(lr=lr)  # torch's own key
        optimizer.zero_grad(set_to_none=True)
        step_bits = 0.0
        for _ in range(config.grad_accum):
            batch = data.sample("train", config.batch_size, generator).to(device)
            loss = model.loss_bpd(batch.tokens, mask=batch.mask)
            (loss / config.grad_accum).backward()
            step_bits += float(loss.detach()) / config.grad_accum
            progress.tokens_seen += batch.tokens.numel()
        if not math.isfinite(step_bits):  # NaN / inf: every later step would be too; never an `ok` row
            raise TrainingDiverged(f"training diverged at step {progress.step + 1}: loss {step_bits} bits per dim (lr {lr:g})")
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        progress.step += 1
        progress.bits_sum += step_bits
        progress.bits_steps += 1
        progress.wall_s += time.perf_counter() - started
        if progress.step % config.eval_every == 0 or progress.step == config.steps:
            timed_point(lr)
        if progress.step == last or (config.checkpoint_every and progress.step % config.checkpoint_every == 0):
            save()
    return curve
