"""LMA's pure id maths: keys, minhash permutations, streamed signatures, and measured memory sharing.

The sharing tests are the design check: on pairs of sets with a known Jaccard similarity J, the fraction
of chunks two values share must match J**K within binomial sampling error (4 standard deviations), and
values with disjoint sets must collide only at the random rate 1/rows.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest
import torch

from embeddings.remap import unsigned_mod_rows, wrap_of
from embeddings.hashing import hash64, mix64, unsigned_mod
from embeddings.lma_minhash import (
    KEY_SEED,
    SignatureAccumulator,
    chunk_addresses,
    key_salts,
    row_ranks,
    set_signatures,
    value_keys,
)

SAMPLED_ROWS = 4000


def _pairs_with_jaccard(count: int, jaccard: float, union: int, seed: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """``count`` pairs of row sets, each with |A & B| / |A | B| exactly ``jaccard``."""
    gen = np.random.default_rng(seed)
    common = int(round(jaccard * union))
    left, right = [], []
    for _ in range(count):
        rows = gen.choice(SAMPLED_ROWS, size=union, replace=False)
        only = union - common
        a_only = only // 2
        left.append(rows[: common + a_only])
        right.append(np.concatenate([rows[:common], rows[common + a_only:]]))
    return left, right


def _shared_fraction(left: List[np.ndarray], right: List[np.ndarray], chunks: int, k: int, rows: int,
                     seed: int) -> Tuple[float, int]:
    ranks = row_ranks(SAMPLED_ROWS, chunks * k, seed)
    sig_a = torch.from_numpy(set_signatures(left, ranks))
    sig_b = torch.from_numpy(set_signatures(right, ranks))
    n = torch.tensor(rows)
    wrap = torch.tensor(wrap_of([rows])[0])
    same = chunk_addresses(sig_a, k, seed, n, wrap) == chunk_addresses(sig_b, k, seed, n, wrap)
    return float(same.double().mean()), same.numel()


def _within_binomial(observed: float, expected: float, trials: int, sigmas: float = 4.0) -> bool:
    sd = math.sqrt(max(expected * (1 - expected), 1e-12) / trials)
    return abs(observed - expected) <= sigmas * sd + 1e-9


@pytest.mark.parametrize("jaccard", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_chunks_follow_jaccard_to_the_k(jaccard: float, k: int) -> None:
    rows = 1 << 40  # random collisions negligible: the LSH term alone
    left, right = _pairs_with_jaccard(300, jaccard, union=40, seed=int(jaccard * 100) + k)
    observed, trials = _shared_fraction(left, right, chunks=8, k=k, rows=rows, seed=7)
    expected = jaccard**k + (1 - jaccard**k) / rows
    assert _within_binomial(observed, expected, trials), (observed, expected, trials)


def test_unrelated_values_collide_at_the_random_rate() -> None:
    rows = 40
    left, right = _pairs_with_jaccard(1500, 0.0, union=20, seed=1)
    observed, trials = _shared_fraction(left, right, chunks=8, k=2, rows=rows, seed=11)
    assert _within_binomial(observed, 1 / rows, trials), (observed, 1 / rows, trials)


def test_chunk_index_is_mixed_in_and_addresses_span_the_whole_table() -> None:
    """Defects of the reference code avoided: the chunk index changes the address, and no intermediate
    reduction confines addresses to [0, 125000)."""
    ranks = row_ranks(SAMPLED_ROWS, 8 * 2, seed=0)
    gen = np.random.default_rng(0)
    sets = [gen.choice(SAMPLED_ROWS, size=5, replace=False) for _ in range(2000)]
    rows = 1 << 30
    addresses = chunk_addresses(torch.from_numpy(set_signatures(sets, ranks)), 2, 0, torch.tensor(rows),
                                torch.tensor(wrap_of([rows])[0]))
    assert addresses.shape == (2000, 8)
    equal_to_chunk0 = (addresses[:, 1:] == addresses[:, :1]).double().mean()
    assert float(equal_to_chunk0) < 1e-3
    assert int(addresses.max()) > 100 * 125_000 and int(addresses.min()) >= 0
    # identical sets share every chunk; the same signature under another seed maps elsewhere
    same = chunk_addresses(torch.from_numpy(set_signatures([sets[0], sets[0]], ranks)), 2, 0, torch.tensor(rows),
                           torch.tensor(wrap_of([rows])[0]))
    assert torch.equal(same[0], same[1])
    other_seed = chunk_addresses(torch.from_numpy(set_signatures([sets[0]], ranks)), 2, 1, torch.tensor(rows),
                                 torch.tensor(wrap_of([rows])[0]))
    assert not torch.equal(other_seed[0], same[0])


def test_value_keys_are_the_pinned_hash_per_feature() -> None:
    ids = torch.tensor([0, 1, -5, 2**40, -(2**62)])
    for f in range(3):
        keys = value_keys(ids, torch.full_like(ids, f))
        assert torch.equal(keys, hash64(ids, f, KEY_SEED, 0))
        assert torch.equal(keys, mix64(ids ^ key_salts(3)[f]))
    assert not torch.equal(value_keys(ids, torch.zeros_like(ids)), value_keys(ids, torch.ones_like(ids)))


def test_row_ranks_are_seeded_permutations() -> None:
    ranks = row_ranks(500, 6, seed=3)
    assert ranks.dtype == np.int32 and ranks.shape == (500, 6)
    for j in range(6):
        assert sorted(ranks[:, j].tolist()) == list(range(500))
    assert np.array_equal(ranks, row_ranks(500, 6, seed=3))
    assert not np.array_equal(ranks, row_ranks(500, 6, seed=4))
    assert not np.array_equal(ranks[:, 0], ranks[:, 1])


@pytest.mark.parametrize("max_pairs", [1, 7, 10**6])
def test_streamed_signatures_equal_the_sets_minhash(max_pairs: int) -> None:
    """Sort-reduce over (value, row) pairs in any chunking == min rank over each value's explicit set."""
    gen = np.random.default_rng(5)
    ranks = row_ranks(300, 4, seed=2)
    keys = gen.integers(-(2**62), 2**62, size=40)
    features = gen.integers(0, 3, size=40)
    sets = {int(k): gen.choice(300, size=int(gen.integers(1, 20)), replace=True) for k in keys}  # repeats too
    pairs = [(k, r, f) for k, f in zip(keys.tolist(), features.tolist()) for r in sets[k].tolist()]
    order = gen.permutation(len(pairs))
    acc = SignatureAccumulator(ranks, max_pairs=max_pairs)
    for chunk in np.array_split(order, 9):
        acc.add(np.array([pairs[i][0] for i in chunk], dtype=np.int64), np.array([pairs[i][1] for i in chunk]),
                np.array([pairs[i][2] for i in chunk]))
    result = acc.result()
    assert np.array_equal(result.keys, np.sort(keys))
    expected = set_signatures([sets[int(k)] for k in result.keys], ranks)
    assert np.array_equal(result.signatures, expected)
    assert result.counts.tolist() == [len(sets[int(k)]) for k in result.keys]
    feature_of = dict(zip(keys.tolist(), features.tolist()))
    assert result.features.tolist() == [feature_of[int(k)] for k in result.keys]
    assert acc.merges >= (1 if max_pairs > len(pairs) else 9)


def test_per_element_modulus_equals_the_pinned_unsigned_mod() -> None:
    h = mix64(torch.arange(-500, 500, dtype=torch.int64) * 7919)
    for n in (1, 3, 40, 125_000, (1 << 62) - 7):
        got = unsigned_mod_rows(h, torch.tensor(n), torch.tensor(wrap_of([n])[0]))
        assert torch.equal(got, unsigned_mod(h, n))
