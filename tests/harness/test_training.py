"""harness.training: schedules, bits per dim, overfitting a batch, exact resume, eval with other attention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.data import Batch, DuplicationData
from harness.training import (
    CheckpointError,
    EvalConfig,
    TrainConfig,
    TrainingDiverged,
    build_model,
    evaluate,
    load_checkpoint,
    lr_multiplier,
    slim_checkpoint,
    train,
    with_attention,
)

MODEL = dict(vocab_size=16, d_model=32, n_heads=2, d_ff=32, n_layers=1, max_seq_len=32, residual="standard", causal=True)
LSH = {"n_hashes": 2, "bucket_size": 8}


class OneBatch:
    """The same fixed batch every time: a model should memorise it."""

    has_accuracy = True
    vocab_size = 16
    seq_len = 32

    def __init__(self):
        self.batch = DuplicationData(32, 16).sample("train", 4, torch.Generator().manual_seed(0))

    def sample(self, split, batch_size, generator):
        return Batch(self.batch.tokens, None)


def _comparable(curve):
    """Curve points without wall time, NaN replaced by a marker (NaN != NaN), for exact comparison."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in p.items() if k != "wall_s"} for p in curve]


def test_schedules():
    cosine = TrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert lr_multiplier(0, cosine) == pytest.approx(0.1) and lr_multiplier(9, cosine) == pytest.approx(1.0)
    assert lr_multiplier(10, cosine) == pytest.approx(1.0) and lr_multiplier(100, cosine) == pytest.approx(0.0)
    assert lr_multiplier(55, cosine) == pytest.approx(0.5)
    inverse = TrainConfig(steps=100, warmup_steps=16, schedule="inverse_sqrt")
    assert lr_multiplier(63, inverse) == pytest.approx(0.5)
    floor = TrainConfig(steps=100, warmup_steps=0, min_lr_ratio=0.1)
    assert lr_multiplier(100, floor) == pytest.approx(0.1)


def test_untrained_model_is_near_uniform_and_evaluation_is_repeatable():
    data = DuplicationData(32, 16)
    model = build_model(MODEL, "lsh", LSH, seed=0)
    before = torch.get_rng_state()
    first = evaluate(model, data, EvalConfig(batches=2, batch_size=8))
    assert torch.equal(before, torch.get_rng_state())  # evaluation does not disturb training's RNG
    assert first == evaluate(model, data, EvalConfig(batches=2, batch_size=8))
    assert first["bpd"] == pytest.approx(math.log2(16), abs=0.2)
    assert first["symbols"] == 2 * 8 * 15 and 0 <= first["accuracy"] <= 100


def test_tiny_model_overfits_a_tiny_batch():
    torch.set_num_threads(1)
    model = build_model(MODEL, "full", {"shared_qk": True}, seed=0)
    curve = train(model, OneBatch(), TrainConfig(steps=60, lr=1e-2, warmup_steps=5, eval_every=60), EvalConfig(batches=1, batch_size=4))
    assert curve[0]["eval_bpd"] > 3.5
    assert curve[-1]["eval_bpd"] < 0.5 and curve[-1]["step"] == 60
    assert curve[-1]["tokens_seen"] == 60 * 4 * 32


def test_resume_from_checkpoint_continues_the_same_curve(tmp_path):
    torch.set_num_threads(1)
    data = DuplicationData(32, 16)
    config = TrainConfig(steps=12, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=3, eval_every=4, checkpoint_every=6)
    evaluation = EvalConfig(batches=1, batch_size=4)

    def fresh():
        return build_model(MODEL, "lsh", LSH, seed=config.seed)  # LSH: rotations come from the global RNG

    straight = train(fresh(), data, config, evaluation)
    checkpoint = tmp_path / "ckpt.pt"
    recorded = []
    partial = train(fresh(), data, config, evaluation, checkpoint=checkpoint, stop_after=6, record=recorded.append)
    assert [p["step"] for p in partial] == [0, 4] and checkpoint.exists()
    torch.manual_seed(999)  # whatever happened in between does not matter
    resumed_model = fresh()
    resumed = train(resumed_model, data, config, evaluation, checkpoint=checkpoint, record=recorded.append)
    assert [p["step"] for p in recorded] == [0, 4, 8, 12]  # resumed points only are recorded again
    assert _comparable(resumed) == _comparable(straight)
    # a finished (and slimmed) checkpoint resumes to the end immediately, with the trained weights
    slim_checkpoint(checkpoint)
    assert "optimizer" not in torch.load(checkpoint, weights_only=True)
    finished = fresh()
    again = train(finished, data, config, evaluation, checkpoint=checkpoint)
    assert again[-1]["eval_bpd"] == straight[-1]["eval_bpd"]
    assert all(torch.equal(a, b) for a, b in zip(finished.state_dict().values(), resumed_model.state_dict().values()))


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    data = DuplicationData(32, 16)
    evaluation = EvalConfig(batches=1, batch_size=4)
    checkpoint = tmp_path / "ckpt.pt"
    train(build_model(MODEL, "lsh", LSH, seed=0), data, TrainConfig(steps=2, eval_every=1, batch_size=2), evaluation, checkpoint=checkpoint)
    curve = train(
        build_model(MODEL, "lsh", LSH, seed=0), data, TrainConfig(steps=3, eval_every=1, batch_size=2), evaluation, checkpoint=checkpoint
    )
    assert [p["step"] for p in curve] == [0, 1, 2, 3]


def test_eval_with_other_attention_loads_the_trained_weights():
    trained = build_model(MODEL, "lsh", LSH, seed=0)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.01)  # differ from a fresh build
    for name, params in (("full", {"shared_qk": True}), ("lsh", {"n_hashes": 8, "bucket_size": 8}), ("sdpa", {"shared_qk": True})):
        other = with_attention(trained, name, params)
        assert other.config.attention == name and other.config.attention_params == {name: params}
        state = trained.state_dict()
        assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    # LSH with a bucket as long as the sequence attends to everything: the same function as shared-QK full
    x = torch.randint(0, 16, (2, 32))
    full = with_attention(trained, "full", {"shared_qk": True})
    wide = with_attention(trained, "lsh", {"n_hashes": 1, "bucket_size": 32})
    torch.testing.assert_close(full(x), wide(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        with_attention(trained, "full", {"shared_qk": False})


class Gadget:
    """A pickle gadget: unpickling it creates the file `marker` (stands for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_a_pickle_gadget_runs_no_code_at_any_load_site(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"fingerprint": None, "model": {}, "gadget": Gadget(marker)}, checkpoint)
    with open(checkpoint, "rb") as handle:  # the gadget is live: an unrestricted unpickler runs it
        torch.load(handle, weights_only=False)
    assert marker.exists()
    marker.unlink()
    data, evaluation = DuplicationData(32, 16), EvalConfig(batches=1, batch_size=2)
    sites = {
        "load_checkpoint": lambda: load_checkpoint(checkpoint),
        "slim_checkpoint": lambda: slim_checkpoint(checkpoint),
        "train (a resume)": lambda: train(
            build_model(MODEL, "full", {}, seed=0), data, TrainConfig(steps=1, batch_size=2), evaluation, checkpoint=checkpoint
        ),
    }
    for site, load in sites.items():
        with pytest.raises(CheckpointError, match="ckpt.pt: cannot load checkpoint"):
            load()
        assert not marker.exists(), site
    torch.save([1, 2], checkpoint)
    with pytest.raises(CheckpointError, match="holds a dict, got list"):
        load_checkpoint(checkpoint)


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    data, evaluation = DuplicationData(32, 16), EvalConfig(batches=1, batch_size=2)
    config = TrainConfig(steps=1, batch_size=2, eval_every=1)
    checkpoint = tmp_path / "ckpt.pt"
    train(build_model(MODEL, "full", {}, seed=0), data, config, evaluation, checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {"not": torch.zeros(1)}
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(build_model(MODEL, "full", {}, seed=0), data, config, evaluation, checkpoint=checkpoint)


def test_a_loss_that_becomes_nan_or_inf_stops_training_as_diverged():
    torch.manual_seed(0)
    config = TrainConfig(steps=20, batch_size=4, lr=1e30, warmup_steps=0, schedule="constant", grad_clip=None, eval_every=20)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: loss (nan|inf)"):
        train(build_model(MODEL, "full", {}, seed=0), OneBatch(), config, EvalConfig(batches=1, batch_size=4))


@pytest.mark.parametrize("field, value", [("lr", math.inf), ("lr", math.nan), ("weight_decay", math.inf), ("grad_clip", math.nan)])
def test_non_finite_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        TrainConfig(**{field: value}).validate()
