"""Hot rows: which ids are hot, and a lookup that finds exactly them (packed and verified keys)."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch

from embeddings.hot_rows import HotLookup, HotSet, hot_bytes
from embeddings.id_counts import IdCounts


def _counts(values: List[List[int]], counts: List[List[int]]) -> IdCounts:
    order = [np.argsort(v) for v in values]
    return IdCounts([f"f{i}" for i in range(len(values))],
                    [np.asarray(v, np.int64)[o] for v, o in zip(values, order)],
                    [np.asarray(c, np.int64)[o] for c, o in zip(counts, order)],
                    [int(sum(c)) for c in counts], [True] * len(values), [0] * len(values), 1 << 20)


def test_select_takes_the_globally_most_frequent_with_min_count() -> None:
    counts = _counts([[3, 1, 2], [10, 20], [7]], [[5, 9, 1], [9, 2], [4]])
    hot = HotSet.select(counts, ["f0", "f1", "f2"], num_rows=3, min_count=2)
    assert [v.tolist() for v in hot.values] == [[1, 3], [10], []]  # 9 (f0), 9 (f1), then 5 (f0) beats 4 (f2)
    hot = HotSet.select(counts, ["f0", "f1", "f2"], num_rows=100, min_count=2)
    assert hot.sizes() == [2, 2, 1] and hot.total == 5  # value 2 of f0 (count 1) is below min_count
    # features are matched by name; one absent from the counts gets none
    hot = HotSet.select(counts, ["f2", "zz"], num_rows=10)
    assert [v.tolist() for v in hot.values] == [[7], []]


def _check_lookup(hot: HotSet, queries: torch.Tensor, features: torch.Tensor) -> None:
    lookup = HotLookup(hot)
    buffers = lookup.buffers(torch.device("cpu"))
    meta = lookup.buffers(torch.device("meta"))
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in buffers.items()}
    assert hot_bytes(hot) == sum(v.numel() * v.element_size() for v in buffers.values())
    hit, index = lookup.lookup(queries, features, buffers)
    rows = set()
    for q, f, h, i in zip(queries.tolist(), features.tolist(), hit.tolist(), index.tolist()):
        values = hot.values[f].tolist()
        assert h == (q in values), (q, f)
        if h:
            assert 0 <= i < len(values)
            rows.add((f, i))
    # every hot value of every feature found, each at its own row
    all_f = torch.cat([torch.full((v.size,), f, dtype=torch.int64) for f, v in enumerate(hot.values)])
    all_v = torch.cat([torch.from_numpy(v) for v in hot.values])
    hit, index = lookup.lookup(all_v, all_f, buffers)
    assert bool(hit.all())
    assert len(set(zip(all_f.tolist(), index.tolist()))) == hot.total
    for f, size in enumerate(hot.sizes()):
        assert sorted(index[all_f == f].tolist()) == list(range(size))


def test_packed_lookup_is_exact() -> None:
    values = [np.array([0, 5, 2**32 - 1, 77], np.int64), np.array([5, 6], np.int64), np.empty(0, np.int64)]
    hot = HotSet(("a", "b", "c"), tuple(np.sort(v) for v in values))
    assert hot.mode() == "packed" and hot.key_bytes() == 8
    gen = torch.Generator().manual_seed(0)
    queries = torch.cat([torch.tensor([0, 5, 2**32 - 1, 77, 5, 6, 6, 0, 5, -5, 2**32, 2**62, -(2**63), 7]),
                         torch.randint(-(2**40), 2**40, (200,), generator=gen)])
    features = torch.cat([torch.tensor([0, 0, 0, 0, 1, 1, 0, 2, 2, 0, 0, 1, 1, 1]),
                          torch.randint(0, 3, (200,), generator=gen)])
    _check_lookup(hot, queries, features)


def test_verified_lookup_is_exact_for_any_int64() -> None:
    gen = np.random.default_rng(0)
    values = [np.unique(gen.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64)),
              np.array([-1, 0, 2**62], np.int64)]
    hot = HotSet(("a", "b"), tuple(values))
    assert hot.mode() == "verified" and hot.key_bytes() == 16
    queries = torch.cat([torch.from_numpy(values[0][:50]), torch.from_numpy(values[1]),
                         torch.from_numpy(values[1]), torch.tensor([1, -2, 2**62 + 1])])
    features = torch.cat([torch.zeros(50, dtype=torch.int64), torch.ones(3, dtype=torch.int64),
                          torch.zeros(3, dtype=torch.int64), torch.tensor([1, 1, 1])])
    _check_lookup(hot, queries, features)


def test_empty_hot_set_keeps_no_state() -> None:
    lookup = HotLookup(HotSet.empty(["a", "b"]))
    assert lookup.buffers(torch.device("cpu")) == {} and hot_bytes(HotSet.empty(["a"])) == 0
    hit, index = lookup.lookup(torch.tensor([1, 2]), torch.tensor([0, 1]), {})
    assert not bool(hit.any()) and index.tolist() == [0, 0]


def test_select_rejects_negative_rows() -> None:
    with pytest.raises(ValueError, match="hot rows"):
        HotSet.select(_counts([[1]], [[1]]), ["f0"], num_rows=-1)
