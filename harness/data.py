"""Datasets for the quality suites: every one yields `[batch, seq_len]` token batches for an LM.

| task          | what                                                                      | vocab |
|---------------|---------------------------------------------------------------------------|-------|
| `duplication` | `0 w 0 w`, w uniform over symbols 1..V-1 (paper Table 2); only the second | V     |
|               | w is scored, so loss and accuracy measure copying                         |       |
| `bytes`       | byte-level LM on a local file read through one `np.memmap` (enwik8 split  | 256   |
|               | 90M/5M/5M when the file is enwik8, else fractions)                        |       |
| `text`        | the same byte LM on a corpus generated deterministically here (offline)   | 256   |
| `images`      | 8-bit images flattened to sequences of sub-pixels, h-w-c order            | 256   |
|               | (imagenet64 `.npz`, or a generated fixture)                               |       |

A batch is a `Batch(tokens, mask)`: `tokens` [batch, seq_len] int64; `mask` [batch, seq_len] bool
or None, which tokens are scored as prediction targets (None = every token but the first). The
model predicts token t+1 from tokens <= t, so bits per dim = mean over scored tokens of
-log2 p(token), exactly `variants.model.bits_per_dim` on `logits[:, :-1]`, `tokens[:, 1:]`,
`mask[:, 1:]`.
"""

from __future__ import annotations

import itertools
import os
import random
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from harness.safe_io import LIMITS, InputFileError, check_regular
from harness.store.schema import SEED, SEQ_LEN, VOCAB_SIZE

SPLITS = ("train", "valid", "test")
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # bytes: train, valid, test (the standard split)
ENWIK8_ENV = "REFORMER_ENWIK8"
ENWIK8_DEFAULT = Path("data") / "enwik8"
ENWIK8_HOWTO = (
    "get it with: curl -LO http://mattmahoney.net/dc/enwik8.zip && unzip enwik8.zip -d data/  "
    f"(or set {ENWIK8_ENV}=/path/to/enwik8, or give task.path in the suite)"
)
IMAGENET64_HOWTO = (
    "download the downsampled ImageNet 64x64 .npz batches from https://image-net.org/download-images "
    "(Imagenet64_train_npz / Imagenet64_val_npz) and give task.path (and task.valid_path)"
)


class DataError(Exception):
    """A dataset that cannot be built (missing or malformed file); str is a human message."""


@dataclass
class Batch:
    """tokens: [batch, seq_len] int64; mask: [batch, seq_len] bool (scored targets) or None (all but the first)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), None if self.mask is None else self.mask.to(device))


class LMData(Protocol):
    """What the training loop needs from a dataset."""

    vocab_size: int
    seq_len: int
    has_accuracy: bool  # whether next-token accuracy on the scored tokens is a meaningful metric

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """A random batch of `split` drawn with `generator` (deterministic given its state)."""
        ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------- duplication


class DuplicationData:
    """The duplication task of the Reformer paper (Table 2): sequences `0 w 0 w`.

    seq_len: even total length (paper: 1024), so w has seq_len / 2 - 1 symbols; vocab_size: V
    (paper: 128), w is uniform over 1..V-1 and 0 is the separator. The scored tokens are the second
    w (positions seq_len / 2 + 1 .. seq_len - 1): predicting them needs a lookup of the first copy,
    the rest is unpredictable noise. Splits are the same distribution (fresh random draws).
    """

    has_accuracy = True

    def __init__(self, seq_len: int = 1024, vocab_size: int = 128):
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"duplication seq_len must be even and >= 4, got {seq_len}")
        if vocab_size < 2:
            raise ValueError(f"duplication vocab_size must be >= 2 (separator plus symbols), got {vocab_size}")
        self.seq_len = seq_len
        self.vocab_size = vocab_size

    def score_mask(self) -> torch.Tensor:
        """[seq_len] bool: True on the second copy of w (the scored tokens)."""
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.seq_len // 2 + 1 :] = True
        return mask

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """[batch_size, seq_len] sequences `0 w 0 w` and the second-half mask (split is ignored)."""
        _check_split(split)
        half = self.seq_len // 2
        w = torch.randint(1, self.vocab_size, (batch_size, half - 1), generator=generator)
        zero = torch.zeros(batch_size, 1, dtype=torch.long)
        tokens = torch.cat([zero, w, zero, w], dim=1)
        return Batch(tokens, self.score_mask().expand(batch_size, -1))


# --------------------------------------------------------------------------- byte streams


class ByteStreamData:
    """Byte-level LM over one uint8 array split into train/valid/test ranges.

    Batches are `batch_size` windows of `seq_len` bytes at uniformly random offsets inside the
    split (all tokens but the first scored). `array` may be an np.memmap: windows are copied out
    of it per batch, the file itself is opened once.
    """

    has_accuracy = False
    vocab_size = 256

    def __init__(self, array: np.ndarray, seq_len: int, split_sizes: Sequence[int], name: str = "bytes"):
        if len(split_sizes) != 3 or sum(split_sizes) > len(array):
            raise DataError(f"{name}: split sizes {tuple(split_sizes)} do not fit its {len(array)} bytes")
        self.name = name
        self.seq_len = seq_len
        self.array = array
        bounds = np.cumsum([0, *split_sizes])
        self.ranges = {s: (int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(SPLITS)}
        for split, (start, stop) in self.ranges.items():
            if stop - start < seq_len and split_sizes[SPLITS.index(split)] > 0:
                raise DataError(f"{name}: the {split} split has {stop - start} bytes, fewer than seq_len={seq_len}")

    def split(self, split: str) -> np.ndarray:
        """The bytes of `split` (a view, no copy)."""
        _check_split(split)
        start, stop = self.ranges[split]
        return self.array[start:stop]

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """[batch_size, seq_len] windows at random offsets within `split`; mask None (all scored)."""
        _check_split(split)
        start, stop = self.ranges[split]
        if stop - start < self.seq_len:
            raise DataError(f"{self.name}: the {split} split is empty or shorter than seq_len={self.seq_len}")
        offsets = torch.randint(start, stop - self.seq_len + 1, (batch_size,), generator=generator).tolist()
        windows = np.stack([np.asarray(self.array[o : o + self.seq_len]) for o in offsets])
        return Batch(torch.from_numpy(windows.astype(np.int64)))


def fraction_split(n_bytes: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Byte counts (train, valid, test) of `n_bytes` split by `fractions` (summing to <= 1)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split must be three non-negative fractions summing to at most 1, got {list(fractions)}")
    train, valid = int(n_bytes * fractions[0]), int(n_bytes * fractions[1])
    test = min(int(n_bytes * fractions[2]), n_bytes - train - valid)
    return train, valid, test


def resolve_bytes_path(path: str | Path | None) -> Path:
    """The byte file to read: `path`, else $REFORMER_ENWIK8, else data/enwik8.

    Raises DataError naming every place looked at and how to get enwik8 when none exists.
    """
    env = os.environ.get(ENWIK8_ENV)
    candidates: list[tuple[str, Path]] = []
    if path is not None:
        candidates.append(("task.path", Path(path).expanduser()))
    else:
        if env:
            candidates.append((f"${ENWIK8_ENV}", Path(env).expanduser()))
        candidates.append(("default", ENWIK8_DEFAULT))
    for _, candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = "; ".join(f"{where}: {p.resolve() if not p.is_absolute() else p}" for where, p in candidates)
    if path is None and not env:
        looked += f"; ${ENWIK8_ENV} is not set"
    raise DataError(f"byte data file not found (looked at {looked}); {ENWIK8_HOWTO}")


def is_enwik8(path: Path, n_bytes: int) -> bool:
    """Whether `path` is enwik8: named enwik8 (any extension) and exactly 100M bytes."""
    return path.name.split(".")[0] == "enwik8" and n_bytes == ENWIK8_BYTES


def bytes_data(path: str | Path | None, seq_len: int, split: Sequence[float] = (0.9, 0.05, 0.05)) -> ByteStreamData:
    """Byte LM on a local file through one np.memmap: enwik8's standard 90M/5M/5M split when the
    file is enwik8, otherwise `split` fractions (train, valid, test)."""
    file = resolve_bytes_path(path)
    array = np.memmap(file, dtype=np.uint8, mode="r")
    sizes = ENWIK8_SPLIT if is_enwik8(file, len(array)) else fraction_split(len(array), split)
    return ByteStreamData(array, seq_len, sizes, name=str(file))


# --------------------------------------------------------------------------- generated text corpus

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice("nrsl") if rng.random() < 0.3 else "") for _ in range(syllables)
    )


@lru_cache(maxsize=4)
def synthetic_corpus(n_bytes: int = 2_000_000, seed: int = 0) -> bytes:
    """A deterministic English-like ASCII corpus of exactly `n_bytes` bytes (same seed, same bytes).

    Paragraphs of sentences built from a seeded lexicon (function words, Zipf-distributed nouns,
    verbs and adjectives) by a few templates; each paragraph has a topic noun it keeps repeating
    and a numbered heading, so there is structure at word, sentence and paragraph range. A byte LM
    goes from 8 bits/byte to roughly 2 within a few hundred steps. Built with `random.Random`
    only, so the bytes do not depend on numpy or torch versions.
    """
    rng = random.Random(seed)
    nouns = sorted({_word(rng, rng.choice((1, 2, 2, 3))) for _ in range(400)})
    verbs = sorted({_word(rng, rng.choice((1, 2))) + rng.choice(("s", "ed", "es")) for _ in range(150)})
    adjectives = sorted({_word(rng, 2) + rng.choice(("y", "ic", "al", "ous")) for _ in range(120)})
    names = sorted({_word(rng, 2).capitalize() for _ in range(40)})
    cum_zipf = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(nouns))))
    templates = (
        "the {a} {n} {v} the {n}",
        "a {n} {v} {p} the {a} {n}",
        "{N} {v} the {t}",
        "the {t} {v} {p} {N}",
        "every {n} {v} a {a} {t}",
        "{N} and {N} {v} the {n} {p} the {t}",
        "why does the {t} {v} the {n}",
        "the {n} of the {t} is {a}",
    )
    prepositions = ("in", "on", "with", "under", "near", "for", "from")
    pick = {
        "a": lambda: rng.choice(adjectives),
        "n": lambda: rng.choices(nouns, cum_weights=cum_zipf)[0],
        "v": lambda: rng.choice(verbs),
        "p": lambda: rng.choice(prepositions),
        "N": lambda: rng.choice(names),
    }
    parsed = [[(piece[1:-1], None) if piece.startswith("{") else (None, piece) for piece in t.split()] for t in templates]
    out: list[str] = []
    size = 0
    section = 0
    while size < n_bytes:
        section += 1
        topic = rng.choices(nouns, cum_weights=cum_zipf)[0]
        paragraph = [f"== {section}. {topic.capitalize()} ==\n"]
        for _ in range(rng.randint(3, 8)):
            template = rng.choice(parsed)
            sentence = " ".join(word if kind is None else (topic if kind == "t" else pick[kind]()) for kind, word in template)
            end = "?" if sentence.startswith("why") else ("!" if rng.random() < 0.05 else ".")
            if rng.random() < 0.2:
                sentence += f", {rng.randint(1, 1999)} times"
            paragraph.append(sentence[0].upper() + sentence[1:] + end + " ")
        text = "".join(paragraph).rstrip() + "\n\n"
        out.append(text)
        size += len(text)
    return "".join(out).encode("ascii")[:n_bytes]


def text_data(seq_len: int, n_bytes: int = 2_000_000, seed: int = 0, split: Sequence[float] = (0.9, 0.05, 0.05)) -> ByteStreamData:
    """Byte LM on `synthetic_corpus(n_bytes, seed)`: runs offline, identical on every machine."""
    array = np.frombuffer(synthetic_corpus(n_bytes, seed), dtype=np.uint8)
    return ByteStreamData(array, seq_len, fraction_split(len(array), split), name=f"text(n_bytes={n_bytes}, seed={seed})")


# --------------------------------------------------------------------------- images


class ImageData:
    """Bits per dim on 8-bit images: each image [H, W, C] flattened in h-w-c order to H*W*C tokens.

    `train` / `valid` / `test`: uint8 arrays [N, H, W, C]. seq_len = H * W * C (12288 for imagenet64);
    every sub-pixel but the first is scored. Batches are random images of the split.
    """

    has_accuracy = False
    vocab_size = 256

    def __init__(self, splits: dict[str, np.ndarray], name: str = "images"):
        shapes = {s: a.shape[1:] for s, a in splits.items() if len(a)}
        if len(set(shapes.values())) != 1:
            raise DataError(f"{name}: splits have different image shapes {shapes}")
        self.name = name
        self.splits = splits
        self.image_shape = next(iter(shapes.values()))
        self.seq_len = int(np.prod(self.image_shape))

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """[batch_size, H*W*C] flattened images drawn uniformly from `split`; mask None."""
        _check_split(split)
        images = self.splits.get(split)
        if images is None or not len(images):
            raise DataError(f"{self.name}: the {split} split holds no images")
        index = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
        return Batch(torch.from_numpy(np.asarray(images[np.sort(index)]).reshape(batch_size, -1).astype(np.int64)))


def load_image_npz(path: str | Path, image_size: int | None = None) -> np.ndarray:
    """uint8 images [N, H, W, C] from an `.npz` with key `data`.

    imagenet64 format: `data` [N, 3 * S * S] uint8, channel-planar (all R, then G, then B) -> reshaped
    to [N, 3, S, S] and moved to h-w-c; S is inferred (or `image_size`). 4-D [N, H, W, C] data is taken as is.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"image file not found: {path.resolve()}; {IMAGENET64_HOWTO}")
    try:
        check_regular(path, "data", "image file")
        archive = np.load(path, allow_pickle=False)  # never pickle: an object array is refused
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: expected an array named 'data' (imagenet64 .npz format), found a single array (.npy)")
        with archive:
            if "data" not in archive:
                raise DataError(f"{path}: expected an array named 'data' (imagenet64 .npz format), found {list(archive.keys())}")
            size = archive.zip.getinfo("data.npy").file_size  # uncompressed: a small .npz may hold a huge array
            if size > LIMITS["data"]:
                raise DataError(f"{path}: 'data' is {size:,} bytes uncompressed, larger than the {LIMITS['data']:,} allowed")
            data = archive["data"]
    except InputFileError as error:
        raise DataError(str(error)) from None
    except (ValueError, TypeError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz of uint8 images ({type(error).__name__}: {error})") from None
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 (8-bit images), got {data.dtype}")
    if data.ndim == 4:
        return data
    if data.ndim != 2 or data.shape[1] % 3:
        raise DataError(f"{path}: 'data' must be [N, 3*S*S] or [N, H, W, C], got shape {data.shape}")
    size = image_size or int(round((data.shape[1] // 3) ** 0.5))
    if 3 * size * size != data.shape[1]:
        raise DataError(f"{path}: rows of {data.shape[1]} values are not 3 x {size} x {size} images")
    return data.reshape(len(data), 3, size, size).transpose(0, 2, 3, 1)


def synthetic_images(n_images: int = 256, image_size: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic smooth 8-bit RGB images [n_images, S, S, 3]: colour gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, image_size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    base = rng.uniform(0, 255, (n_images, 1, 1, 3))
    slope = rng.uniform(-100, 100, (n_images, 2, 1, 1, 3))
    images = base + slope[:, 0] * yy[None, :, :, None] + slope[:, 1] * xx[None, :, :, None]
    images += rng.normal(0, 4, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_image_fixture(path: str | Path, n_images: int = 32, image_size: int = 8, seed: int = 0) -> Path:
    """Write `synthetic_images` as an imagenet64-format `.npz` (`data` [N, 3*S*S], channel-planar)."""
    images = synthetic_images(n_images, image_size, seed)
    path = Path(path)
    np.savez(path, data=images.transpose(0, 3, 1, 2).reshape(n_images, -1))
    return path


def image_data(
    path: str | Path | None = None,
    valid_path: str | Path | None = None,
    image_size: int | None = None,
    n_images: int = 256,
    split: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> ImageData:
    """Images for bits per dim: from `path` (imagenet64 .npz; `valid_path` gives the valid and test
    images, else `split` fractions of `path`), or `synthetic_images` when no path is given."""
    if path is None:
        images = synthetic_images(n_images, image_size or 8, seed)
        name = f"synthetic images ({n_images} x {images.shape[1]}x{images.shape[2]})"
    else:
        images = load_image_npz(path, image_size)
        name = str(path)
    if valid_path is not None:
        held_out = load_image_npz(valid_path, image_size)
        half = len(held_out) // 2
        return ImageData({"train": images, "valid": held_out[:half], "test": held_out[half:]}, name)
    n_train, n_valid, n_test = fraction_split(len(images), split)
    return ImageData(
        {
            "train": images[:n_train],
            "valid": images[n_train : n_train + n_valid],
            "test": images[n_train + n_valid : n_train + n_valid + n_test],
        },
        name,
    )


# --------------------------------------------------------------------------- factory


def check_files(task: dict) -> None:
    """Raise DataError now (not minutes into a run) when a file the task reads is missing."""
    if task["name"] == "bytes":
        resolve_bytes_path(task.get("path"))
    elif task["name"] == "images":
        for key in ("path", "valid_path"):
            if task.get(key) is not None and not Path(task[key]).expanduser().is_file():
                raise DataError(f"image file not found (task.{key}): {Path(task[key]).expanduser().resolve()}; {IMAGENET64_HOWTO}")


def build_data(task: dict) -> LMData:
    """A dataset from a suite's `task:` mapping (`name` plus that task's settings, see harness.suites.quality)."""
    settings = {k: v for k, v in task.items() if k != "name"}
    name = task["name"]
    if name == "duplication":
        return DuplicationData(settings[SEQ_LEN], settings.get(VOCAB_SIZE, 128))
    if name == "bytes":
        return bytes_data(settings.get("path"), settings[SEQ_LEN], settings.get("split", (0.9, 0.05, 0.05)))
    if name == "text":
        return text_data(
            settings[SEQ_LEN], settings.get("n_bytes", 2_000_000), settings.get(SEED, 0), settings.get("split", (0.9, 0.05, 0.05))
        )
    if name == "images":
        return image_data(
            settings.get("path"),
            settings.get("valid_path"),
            settings.get("image_size"),
            settings.get("n_images", 256),
            settings.get("split", (0.9, 0.05, 0.05)),
            settings.get(SEED, 0),
        )
    raise DataError(f"unknown task {name!r}; tasks: duplication, bytes, text, images")
