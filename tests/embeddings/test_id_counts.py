"""Id counting: exact below the capacity, bounded and Misra-Gries-correct above it, deterministic, and an
artifact that refuses damaged files."""

from __future__ import annotations

import collections
import json
import zipfile
from pathlib import Path
from typing import List

import numpy as np
import pytest

from embeddings.id_counts import FrequencyCounter, IdCounts, load_counts, read_header
from embeddings.integrity import array_sha256


def _stream(seed: int, features: int = 3, size: int = 20_000) -> List[List[np.ndarray]]:
    """Zipf-like ids (negative, above 2**32 and repeated small ones) per feature, in batches."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(7):
        batch = []
        for f in range(features):
            ids = rng.zipf(1.3, size // 7).astype(np.int64) * (f + 1)
            ids[::5] = rng.integers(-(2**40), 2**40, ids[::5].size)
            batch.append(ids)
        batches.append(batch)
    return batches


def _count(batches: List[List[np.ndarray]], capacity: int, min_flush: int) -> IdCounts:
    counter = FrequencyCounter(len(batches[0]), capacity, min_flush=min_flush)
    for batch in batches:
        for f, ids in enumerate(batch):
            counter.add(f, ids)
    return counter.result([f"f{i}" for i in range(len(batches[0]))])


def test_exact_counts_below_capacity() -> None:
    batches = _stream(0)
    counts = _count(batches, capacity=1 << 20, min_flush=3000)
    for f in range(3):
        truth = collections.Counter(np.concatenate([b[f] for b in batches]).tolist())
        assert counts.exact[f] and counts.error_bound[f] == 0
        assert counts.values[f].tolist() == sorted(truth)
        assert counts.counts[f].tolist() == [truth[v] for v in sorted(truth)]
        assert counts.totals[f] == sum(truth.values())
    assert counts.table_sizes() == [len(v) + 1 for v in counts.values]


def test_result_does_not_depend_on_how_ids_arrive() -> None:
    batches = _stream(1)
    a = _count(batches, capacity=50, min_flush=1000)
    b = _count([[np.concatenate([x[f] for x in batches]) for f in range(3)]], capacity=50, min_flush=10**9)
    shuffled = [[np.random.default_rng(2).permutation(x[f]) for f in range(3)] for x in batches]
    # batched Misra-Gries prunes at flush points: the same flush points give the same result bit for bit
    c = _count(shuffled, capacity=50, min_flush=1000)
    for f in range(3):
        assert a.values[f].tolist() == c.values[f].tolist() and a.counts[f].tolist() == c.counts[f].tolist()
        assert b.values[f].size <= 50 and not b.exact[f]


def test_bounded_memory_keeps_heavy_hitters_with_bounded_error() -> None:
    """More distinct ids than the capacity: at most ``capacity`` kept per feature, every id more frequent than
    total / (capacity + 1) kept, estimates under the truth by at most the recorded bound."""
    capacity = 64
    batches = _stream(3)
    counts = _count(batches, capacity=capacity, min_flush=500)
    for f in range(3):
        ids = np.concatenate([b[f] for b in batches])
        truth = collections.Counter(ids.tolist())
        assert len(truth) > 10 * capacity  # the bound is really exercised
        assert counts.values[f].size <= capacity and not counts.exact[f]
        total = counts.totals[f]
        assert 0 < counts.error_bound[f] <= total / (capacity + 1)
        kept = dict(zip(counts.values[f].tolist(), counts.counts[f].tolist()))
        for value, n in truth.items():
            if n > total / (capacity + 1):
                assert value in kept, f"heavy hitter {value} ({n} of {total}) dropped"
        for value, estimate in kept.items():
            assert truth[value] - counts.error_bound[f] <= estimate <= truth[value]


def test_ranked_order_is_by_count_then_feature_then_value() -> None:
    counts = IdCounts(["a", "b"], [np.array([5, 7, 9], np.int64), np.array([1, 7], np.int64)],
                      [np.array([2, 3, 3], np.int64), np.array([3, 1], np.int64)], [8, 4], [True, True], [0, 0], 10)
    features, values, n = counts.ranked()
    assert list(zip(features.tolist(), values.tolist(), n.tolist())) == [
        (0, 7, 3), (0, 9, 3), (1, 1, 3), (0, 5, 2), (1, 7, 1)]
    assert counts.ranked(min_count=3)[1].tolist() == [7, 9, 1]


def test_artifact_round_trip_and_damage(tmp_path: Path) -> None:
    counts = _count(_stream(4), capacity=1 << 20, min_flush=1000)
    counts.provenance = {"source": {"path": "x"}, "options": {"capacity": 1 << 20}}
    path = counts.save(tmp_path / "c.npz")
    back = load_counts(path)
    assert back.feature_names == counts.feature_names and back.provenance == counts.provenance
    for f in range(3):
        assert back.values[f].tolist() == counts.values[f].tolist()
        assert back.counts[f].tolist() == counts.counts[f].tolist()
    assert read_header(path)["distinct"] == counts.distinct()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        load_counts(cut)
    with pytest.raises(FileNotFoundError, match="compactrec prepare"):
        load_counts(tmp_path / "missing.npz")
    # a consistent-looking file whose offsets disagree with its arrays
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(path) as src, open(bad, "wb") as f:
        arrays = {name[:-4]: np.load(src.open(name)) for name in src.namelist()}
        arrays["offsets"] = arrays["offsets"] + 1
        header = json.loads(str(arrays["header"]))
        header["sha256"]["offsets"] = array_sha256(arrays["offsets"])  # intact, only inconsistent
        np.savez(f, **{**arrays, "header": np.array(json.dumps(header))})
    with pytest.raises(ValueError, match="inconsistent"):
        load_counts(bad)
    other = tmp_path / "other.npz"
    with open(other, "wb") as f:
        np.savez(f, header=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(ValueError, match="is not 'compactrec-id-counts'"):
        load_counts(other)
