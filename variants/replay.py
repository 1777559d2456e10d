"""What a recomputed layer call must see exactly as its first run did.

The reversible stack's backward calls every f and g again on inputs rebuilt from the outputs
(x2 = y2 - g(y1), x1 = y1 - f(x2)): equal to the forward's only up to rounding. Most of a layer is
continuous in its input, so rounding stays rounding; a discrete choice is not. LSH's buckets are an
argmax: an item whose two largest rotated values lie within rounding of each other can land in
another bucket, its attention changes, the rebuilt input of the layer below moves by far more than
rounding and more items flip there (measured on the 6-layer LSH-8 LM at 16K tokens in float32:
the first layer's input rebuilt with an error twice its own size, so the gradients were wrong).

So a module keeps such a choice in the memo of the call it runs in (`keep`) and takes it back when
the same call is replayed (`recall`), as HuggingFace's Reformer keeps its buckets for the backward.
The stack opens a `CallMemo` per f and g call (`recording`, then `replaying` in every backward);
outside one, `keep` does nothing and `recall` returns None. A reversible stack nested inside an f or
g opens memos of its own: its replays are its own, the outer call's memo does not reach into it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class CallMemo:
    """The values one layer call kept, per kind in call order, for its replays: each replay reads
    them from the first again (a second backward through a retained graph replays the same call);
    they are freed with the memo (the autograd context that holds it)."""

    values: dict[str, list[Any]] = field(default_factory=dict)
    replaying: bool = False
    read: dict[str, int] = field(default_factory=dict)  # in a replay: how many of each kind were recalled


_current: ContextVar[CallMemo | None] = ContextVar("replay_memo", default=None)


@contextmanager
def recording(memo: CallMemo | None) -> Iterator[None]:
    """Run a layer call whose `keep`s go into `memo` (None: nothing is kept)."""
    token = _current.set(memo)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def replaying(memo: CallMemo | None) -> Iterator[None]:
    """Run a replay of the call that filled `memo`: each `recall` returns, in order, what it kept."""
    if memo is not None:
        memo.replaying, memo.read = True, {}
    token = _current.set(memo)
    try:
        yield
    finally:
        _current.reset(token)


def recording_now() -> bool:
    """Whether the code running is a recorded layer call (its `keep`s will be replayed)."""
    memo = _current.get()
    return memo is not None and not memo.replaying


def keep(kind: str, value: Any) -> None:
    """In a recorded call, keep `value` as the next of `kind` for its replay; elsewhere nothing."""
    memo = _current.get()
    if memo is not None and not memo.replaying:
        memo.values.setdefault(kind, []).append(value)


def recall(kind: str) -> Any | None:
    """In a replayed call, the next value of `kind` its first run kept; None outside a replay or when
    this replay has recalled every value of `kind` already."""
    memo = _current.get()
    if memo is None or not memo.replaying:
        return None
    kept, index = memo.values.get(kind, []), memo.read.get(kind, 0)
    if index >= len(kept):
        return None
    memo.read[kind] = index + 1
    return kept[index]
