"""harness.data: the duplication generator, byte files through one memmap, images, the generated corpus."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import data as data_module
from harness.data import (
    DataError,
    DuplicationData,
    build_data,
    bytes_data,
    image_data,
    load_image_npz,
    synthetic_corpus,
    text_data,
    write_image_fixture,
)
from variants.model import bits_per_dim


def test_duplication_sequences_are_0_w_0_w():
    task = DuplicationData(seq_len=16, vocab_size=10)
    batch = task.sample("train", 64, torch.Generator().manual_seed(0))
    tokens, mask = batch.tokens, batch.mask
    assert tokens.shape == (64, 16) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == 0).all() and (tokens[:, 8] == 0).all()
    assert torch.equal(tokens[:, 1:8], tokens[:, 9:])
    w = tokens[:, 1:8]
    assert w.min() >= 1 and w.max() <= 9 and len(w.unique()) == 9  # uniform over 1..V-1, 0 never inside w
    # only the second copy of w is scored
    assert mask.shape == (64, 16) and mask[0].tolist() == [False] * 9 + [True] * 7


def test_duplication_is_deterministic_given_the_generator():
    task = DuplicationData(32, 128)
    a = task.sample("valid", 4, torch.Generator().manual_seed(7)).tokens
    b = task.sample("valid", 4, torch.Generator().manual_seed(7)).tokens
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="even"):
        DuplicationData(31, 128)


def test_uniform_predictor_scores_log2_vocab_bits():
    vocab = 128
    task = DuplicationData(64, vocab)
    batch = task.sample("train", 8, torch.Generator().manual_seed(0))
    logits = torch.zeros(8, 64, vocab)  # uniform prediction everywhere
    bpd = bits_per_dim(logits[:, :-1], batch.tokens[:, 1:], batch.mask[:, 1:])
    assert float(bpd) == pytest.approx(math.log2(vocab), rel=1e-6)


def test_bytes_file_is_memmapped_once_and_split(tmp_path, monkeypatch):
    payload = np.arange(10_000, dtype=np.uint64).astype(np.uint8)
    file = tmp_path / "corpus.bin"
    payload.tofile(file)
    calls = []
    real = np.memmap

    def counting_memmap(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module.np, "memmap", counting_memmap)
    ds = bytes_data(file, seq_len=32, split=(0.8, 0.1, 0.1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = ds.sample("valid", 4, generator)
        assert batch.tokens.shape == (4, 32) and batch.mask is None
        # windows are contiguous bytes from the valid range [8000, 9000)
        first = batch.tokens[:, 0]
        assert torch.equal(batch.tokens, (first[:, None] + torch.arange(32)) % 256)
    assert len(calls) == 1
    assert ds.ranges == {"train": (0, 8000), "valid": (8000, 9000), "test": (9000, 10000)}


def test_enwik8_gets_the_standard_split():
    assert data_module.ENWIK8_SPLIT == (90_000_000, 5_000_000, 5_000_000)
    from pathlib import Path

    assert data_module.is_enwik8(Path("/data/enwik8"), 100_000_000)
    assert not data_module.is_enwik8(Path("/data/enwik8"), 1000)
    assert not data_module.is_enwik8(Path("/data/other.txt"), 100_000_000)


def test_missing_byte_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("REFORMER_ENWIK8", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        build_data({"name": "bytes", "seq_len": 64})
    message = str(error.value)
    assert "REFORMER_ENWIK8" in message and "data/enwik8" in message and "mattmahoney.net" in message
    missing = tmp_path / "nowhere" / "enwik8"
    with pytest.raises(DataError, match=str(missing)):
        bytes_data(missing, 64)
    monkeypatch.setenv("REFORMER_ENWIK8", str(missing))
    with pytest.raises(DataError, match=r"\$REFORMER_ENWIK8: .*nowhere/enwik8"):
        bytes_data(None, 64)


def test_env_var_points_at_the_byte_file(tmp_path, monkeypatch):
    file = tmp_path / "bytes.txt"
    file.write_bytes(b"hello world " * 100)
    monkeypatch.setenv("REFORMER_ENWIK8", str(file))
    ds = build_data({"name": "bytes", "seq_len": 16})
    assert ds.sample("train", 2, torch.Generator().manual_seed(0)).tokens.shape == (2, 16)


def test_synthetic_corpus_is_deterministic_text():
    a = synthetic_corpus(20_000, seed=0)
    assert a == synthetic_corpus(20_000, seed=0) and len(a) == 20_000
    assert a != synthetic_corpus(20_000, seed=1)
    text = a.decode("ascii")
    assert text.startswith("== 1. ") and ". " in text
    ds = text_data(seq_len=64, n_bytes=20_000)
    assert ds.vocab_size == 256 and ds.sample("test", 3, torch.Generator()).tokens.shape == (3, 64)


def test_image_fixture_round_trips_in_imagenet64_format(tmp_path):
    path = write_image_fixture(tmp_path / "images.npz", n_images=10, image_size=4)
    with np.load(path) as archive:
        assert archive["data"].shape == (10, 48) and archive["data"].dtype == np.uint8
    images = load_image_npz(path)
    assert images.shape == (10, 4, 4, 3)
    ds = image_data(path, split=(0.6, 0.2, 0.2))
    assert ds.seq_len == 48 and ds.vocab_size == 256
    batch = ds.sample("train", 5, torch.Generator().manual_seed(0))
    assert batch.tokens.shape == (5, 48) and 0 <= int(batch.tokens.min()) and int(batch.tokens.max()) <= 255
    # flattening is h-w-c: the first three tokens are the first pixel's R, G, B
    raw = np.load(path)["data"].reshape(10, 3, 4, 4)
    assert images[0, 0, 0].tolist() == raw[0, :, 0, 0].tolist()
    with pytest.raises(DataError, match="image file not found"):
        load_image_npz(tmp_path / "missing.npz")


def test_images_without_a_path_are_generated():
    ds = build_data({"name": "images", "n_images": 20, "image_size": 4})
    assert ds.seq_len == 48 and len(ds.splits["train"]) == 18


def test_an_image_file_is_read_without_pickle_and_bounded(tmp_path, monkeypatch):
    from harness.safe_io import LIMITS

    marker = tmp_path / "pwned"
    objects = np.empty(1, dtype=object)
    objects[0] = Gadget(marker)
    np.savez(tmp_path / "objects.npz", data=objects)  # an object array is stored pickled
    with pytest.raises(DataError, match="objects.npz: not a readable .npz of uint8 images .*allow_pickle=False"):
        load_image_npz(tmp_path / "objects.npz")
    assert not marker.exists()
    np.save(tmp_path / "plain.npy", np.zeros((2, 12), np.uint8))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(DataError, match="plain.npz: expected an array named 'data'"):
        load_image_npz(tmp_path / "plain.npz")
    np.savez_compressed(tmp_path / "bomb.npz", data=np.zeros((1000, 3 * 32 * 32), np.uint8))  # 3 MB in a few KB
    monkeypatch.setitem(LIMITS, "data", 100_000)
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    with pytest.raises(DataError, match="'data' is 3,072,128 bytes uncompressed, larger than the 100,000 allowed"):
        load_image_npz(tmp_path / "bomb.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(DataError, match="image file not found"):  # not a regular file: never opened
        load_image_npz(tmp_path / "fifo.npz")


class Gadget:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
