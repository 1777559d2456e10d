"""variants/attention/lsh_hashing.py: bucket counts, rotations, angular-LSH buckets and the sort, against
argmax over concat([xR, -xR]) written out, HF's bucket-count rule and Python's sort."""

import pytest
import torch

import variants.attention.lsh_hashing as lsh_hashing
from variants.attention.lsh_hashing import bucket_factors, draw_rotations, hash_buckets, sort_index


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_bucket_factors_follow_hf_rule_and_reject_odd_counts():
    # HF: 2 * seq_len // chunk buckets, split into two powers of two above 2 * chunk (here: 2 * bucket_size).
    assert bucket_factors(None, 16384, 64) == (16, 32)  # 512 buckets > 128
    assert bucket_factors(None, 1024, 64) == (32,)  # 32 buckets <= 128
    assert bucket_factors(None, 32, 4) == (4, 4)
    assert bucket_factors(8, 1024, 64) == (8,)
    assert bucket_factors([16, 32], 1024, 64) == (16, 32)
    for bad in (3, (2, 5), (), 0):
        with pytest.raises(ValueError, match="even"):
            bucket_factors(bad, 1024, 64)


def test_seeded_rotations_leave_global_rng_and_match_manual_seed():
    with torch.random.fork_rng():
        state = torch.get_rng_state()
        rotations = draw_rotations(2, 4, 3, 8, seed=5, dtype=torch.float64)
        assert torch.equal(torch.get_rng_state(), state)
        assert rotations.shape == (2, 4, 3, 4)
        torch.manual_seed(5)
        assert torch.equal(rotations, torch.randn(2, 4, 3, 4, dtype=torch.float64))


def test_hash_buckets_shared_rotations_and_offsets():
    qk = randn(2, 3, 8, 4, seed=30)
    shared = randn(4, 2, 3, seed=31)
    buckets = hash_buckets(qk, 2, 6, shared)
    assert buckets.shape == (2, 3, 2, 8)
    torch.testing.assert_close(buckets, hash_buckets(qk, 2, 6, shared.expand(3, -1, -1, -1)))
    for r in range(2):
        projected = qk @ shared[:, r]  # [B, H, L, 3]
        expected = torch.cat([projected, -projected], -1).argmax(-1) + 6 * r
        torch.testing.assert_close(buckets[:, :, r], expected)


def test_hash_buckets_in_slices_of_positions(monkeypatch):
    """Slicing the positions (bounded temporaries) changes no bucket, ties (zero vectors) included."""
    qk = randn(2, 3, 40, 4, seed=67)
    qk[0, 1, :5] = 0.0  # every rotation ties: argmax takes the first index
    rotations = randn(3, 4, 2, 2 + 3, seed=68)  # factors (4, 6)
    whole = hash_buckets(qk, 2, (4, 6), rotations)
    monkeypatch.setattr(lsh_hashing, "HASH_SLICE_ELEMENTS", 7 * 2 * 3 * 2 * 5)  # 7 positions per slice
    torch.testing.assert_close(hash_buckets(qk, 2, (4, 6), rotations), whole, rtol=0, atol=0)
    rotated = torch.einsum("bhld,hdnr->bhnlr", qk, rotations)
    first, second = rotated[..., :2], rotated[..., 2:]
    expected = torch.cat([first, -first], -1).argmax(-1) + 4 * torch.cat([second, -second], -1).argmax(-1)
    torch.testing.assert_close(whole, expected + 24 * torch.arange(2).view(2, 1), rtol=0, atol=0)


def test_sort_index_orders_items_by_bucket_then_position():
    seq_len, n_hashes, n_buckets = 6, 2, 3
    gen = torch.Generator().manual_seed(69)
    buckets = torch.randint(0, n_buckets, (2, n_hashes, seq_len), generator=gen)
    buckets = (buckets + n_buckets * torch.arange(n_hashes).view(1, n_hashes, 1)).view(2, -1)  # round offsets
    got = sort_index(buckets.clone(), seq_len)
    for row in range(2):
        keys = buckets[row].tolist()
        expected = sorted(range(n_hashes * seq_len), key=lambda item: (keys[item], item % seq_len))
        assert got[row].tolist() == expected
