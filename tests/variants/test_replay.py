"""variants/replay.py: a layer call's memo, kept in its recorded run and handed back in its replay."""

from __future__ import annotations

import pytest
import torch

from variants import replay
from variants.attention.lsh_hashing import keep_buckets, replayed_buckets


def test_outside_a_layer_call_nothing_is_kept_or_recalled() -> None:
    replay.keep("k", 1)
    assert replay.recall("k") is None and not replay.recording_now()


def test_every_replay_gets_back_what_its_recording_kept_in_order() -> None:
    memo = replay.CallMemo()
    with replay.recording(memo):
        assert replay.recording_now()
        replay.keep("k", "first")
        replay.keep("k", "second")
        replay.keep("other", 3)
        assert replay.recall("k") is None  # a recording does not read back
    assert not replay.recording_now()
    with replay.replaying(memo):
        assert not replay.recording_now()
        replay.keep("k", "ignored")  # a replay keeps nothing
        assert [replay.recall("k"), replay.recall("k"), replay.recall("k")] == ["first", "second", None]
        assert replay.recall("other") == 3
    with replay.replaying(memo):  # a second backward through a retained graph replays the call again
        assert [replay.recall("k"), replay.recall("k"), replay.recall("other")] == ["first", "second", 3]


def test_a_memo_of_none_records_nothing() -> None:
    with replay.recording(None):
        replay.keep("k", 1)
        assert not replay.recording_now()
    with replay.replaying(None):
        assert replay.recall("k") is None


def test_lsh_buckets_are_kept_narrow_and_come_back_as_they_were() -> None:
    memo = replay.CallMemo()
    small = torch.tensor([[0, 5, 32767]])
    large = torch.tensor([[0, 2**15, 2**20]])
    with replay.recording(memo):
        keep_buckets(small, n_buckets=2**15)
        keep_buckets(large, n_buckets=2**20 + 1)
    assert [kept.dtype for kept, _ in memo.values["lsh buckets"]] == [torch.int16, torch.int32]
    with replay.replaying(memo):
        first, second = replayed_buckets((1, 3)), replayed_buckets((1, 3))
        assert replayed_buckets((1, 3)) is None
    assert first.dtype == second.dtype == torch.int64 and torch.equal(first, small) and torch.equal(second, large)
    first.mul_(0)  # the sort overwrites what it gets: the memo's copy stays
    with replay.replaying(memo):
        assert torch.equal(replayed_buckets((1, 3)), small)
        with pytest.raises(RuntimeError, match="out of order"):
            replayed_buckets((2, 3))
