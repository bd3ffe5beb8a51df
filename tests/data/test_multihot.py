"""MLPerf DLRMv2 multi-hot expansion: reference semantics, npz materialisation, on the fly == materialised."""

from __future__ import annotations

import json
import os
import platform
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from trainer.data import multihot
from trainer.data.data_config import DataConfig
from trainer.data.loader import count_rows, make_batches, pooling_factors
from trainer.data.multihot import (
    MLPERF_MULTI_HOT_SIZES, MultiHotSpec, MultiHotTables, materialize_multihot, tables_for,
)  # fmt: skip
from trainer.data.npz import NpzDay

SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 20, 27, 10, 3, 1, 1]
TABLES = [400, 39, 17, 74, 202, 3, 71, 15, 63, 4000, 306, 405, 10, 22, 119, 155, 4, 97, 14, 4000, 4000, 4000,
          590, 129, 108, 36]  # fmt: skip
ROWS = 101


def reference_tables(sizes: List[int], tables: List[int], distribution: str, seed: int) -> List[np.ndarray]:
    """A literal transcription of the reference's lookup tables (whole draws, global legacy RNG)."""
    np.random.seed(seed)
    out = []
    for n, s in zip(tables, sizes):
        extra: np.ndarray
        if distribution == "uniform":
            extra = np.random.randint(0, n, size=(n, s - 1))
        else:
            with np.errstate(invalid="ignore"):
                extra = np.random.pareto(a=0.25, size=(n, s - 1)).astype(np.int32) % n
        out.append(np.concatenate((np.arange(n)[:, None], extra), axis=-1).astype(np.int32))
    return out


def write_one_hot_days(directory: Path, days: int = 3, rows: int = ROWS, seed: int = 0) -> Dict[int, np.ndarray]:
    """One-hot days in the TorchRec layout; ids run past the table sizes so the modulo matters."""
    rng = np.random.default_rng(seed)
    sparse = {}
    for day in range(days):
        sparse[day] = rng.integers(0, 2**31 - 1, (rows, 26)).astype(np.int32)
        np.save(directory / f"day_{day}_sparse.npy", sparse[day])
        np.save(directory / f"day_{day}_dense.npy", np.log(rng.integers(2, 1000, (rows, 13)).astype(np.float32)))
        np.save(directory / f"day_{day}_labels.npy", rng.integers(0, 2, (rows, 1)).astype(np.int32))
    return sparse


def spec(**over: object) -> MultiHotSpec:
    fields = {"sizes": tuple(SIZES), "num_embeddings": tuple(TABLES), **over}
    return MultiHotSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("distribution", ["uniform", "pareto"])
def test_tables_follow_the_reference(distribution: str) -> None:
    if distribution == "pareto" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the reference's out-of-range float->int32 cast is pinned to x86-64 behaviour")
    ref = reference_tables(SIZES, TABLES, distribution, seed=0)
    tables = MultiHotTables(spec(distribution=distribution))
    for f in range(26):
        ids = np.arange(TABLES[f] + 5)  # ids past n_f wrap around
        np.testing.assert_array_equal(tables.expand(f, ids), ref[f][ids % TABLES[f]], err_msg=f"feature {f}")
    if distribution == "pareto":  # the heavy tail (a = 0.25) overflows int32: those draws were compared too
        rs = np.random.RandomState(0)
        raw = [rs.pareto(a=0.25, size=(n, s - 1)) for n, s in zip(TABLES, SIZES)]
        assert sum(int((r >= 2**31).sum()) for r in raw) > 10


def test_golden_values_seed_0() -> None:
    """Pinned numbers (legacy MT19937 streams are stable across NumPy versions)."""
    sizes, tables = [1] * 26, [1000] * 26
    sizes[0], tables[0] = 3, 50
    sizes[2], tables[2] = 2, 7
    t = MultiHotTables(MultiHotSpec(tuple(sizes), tuple(tables)))
    assert t.expand(0, np.array([0, 1, 52])).tolist() == [[0, 44, 47], [1, 0, 3], [2, 3, 39]]
    assert t.expand(2, np.array([0, 1, 2, 3])).tolist() == [[0, 5], [1, 1], [2, 3], [3, 0]]
    assert t.expand(5, np.array([1999])).tolist() == [[999]]


def test_block_draws_equal_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = MultiHotTables(spec(distribution="pareto"))
    monkeypatch.setattr(multihot, "_DRAW_ROWS", 7)
    blocks = MultiHotTables(spec(distribution="pareto"))
    for a, b in zip(whole.extras, blocks.extras):
        np.testing.assert_array_equal(a, b)


def test_seed_and_distribution_change_the_ids() -> None:
    base = MultiHotTables(spec())
    for other in (MultiHotTables(spec(seed=1)), MultiHotTables(spec(distribution="pareto"))):
        assert not np.array_equal(base.extras[20], other.extras[20])


def test_min_table_size_rule() -> None:
    assert spec().effective_sizes == SIZES  # off by default: table 15 (155 rows) keeps its 5 ids
    mlperf_tb = MultiHotSpec(MLPERF_MULTI_HOT_SIZES, tuple([40_000_000] * 15 + [155] + [40_000_000] * 10))
    assert mlperf_tb.effective_sizes[15] == 5 and sum(mlperf_tb.effective_sizes) == 214
    ruled = spec(min_table_size=200)
    expected = [1 if n < 200 else s for s, n in zip(SIZES, TABLES)]
    assert ruled.effective_sizes == expected and expected[15] == 1 and expected[0] == 3
    assert MultiHotTables(ruled).expand(15, np.array([160])).tolist() == [[5]]


@pytest.mark.parametrize("over,match", [
    ({"sizes": (1,) * 25}, "26 integers"), ({"sizes": (0,) * 26}, "26 integers"),
    ({"num_embeddings": (2**31 + 1,) * 26}, "int32"), ({"distribution": "zipf"}, "uniform"),
    ({"seed": -1}, "seed"), ({"min_table_size": -1}, "min_table_size"),
])  # fmt: skip
def test_spec_validation(over: Dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spec(**over)


@pytest.mark.parametrize("over,match", [
    ({"multi_hot_sizes": [1] * 25}, "data.multi_hot_sizes"),
    ({"multi_hot_sizes": [1] * 26, "format": "tsv"}, "needs format 'npy' or 'npz'"),
    ({"num_embeddings_per_feature": [0] * 26}, "data.num_embeddings_per_feature"),
    ({"multi_hot_distribution": "zipf"}, "data.multi_hot_distribution"),
    ({"multi_hot_min_table_size": -1}, "data.multi_hot_min_table_size"),
    ({"multi_hot_seed": 2**32}, "data.multi_hot_seed"),
])  # fmt: skip
def test_data_config_validation(over: Dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**over)  # type: ignore[arg-type]


def test_materialised_npz_is_what_np_savez_writes(tmp_path: Path) -> None:
    sparse = write_one_hot_days(tmp_path, days=1)
    s = spec()
    written = materialize_multihot(str(tmp_path), [0], s, chunk_rows=16)
    assert written == ["day_0_sparse_multi_hot.npz"]
    path = tmp_path / "day_0_sparse_multi_hot.npz"
    tables = tables_for(s)
    expected = {str(f): tables.expand(f, sparse[0][:, f]) for f in range(26)}
    np.savez(tmp_path / "savez.npz", **expected)  # type: ignore[arg-type]
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(tmp_path / "savez.npz") as theirs:
        assert ours.namelist() == theirs.namelist() == [f"{f}.npy" for f in range(26)]
        for a, b in zip(ours.infolist(), theirs.infolist()):
            assert a.compress_type == b.compress_type == zipfile.ZIP_STORED
            assert (a.file_size, a.CRC, a.extra) == (b.file_size, b.CRC, b.extra)
            assert ours.read(a) == theirs.read(b)  # identical .npy bytes: header and data
    loaded = np.load(path)
    for f in range(26):
        assert loaded[str(f)].dtype == np.int32 and loaded[str(f)].shape == (ROWS, SIZES[f])
        np.testing.assert_array_equal(loaded[str(f)][:, 0], sparse[0][:, f] % TABLES[f])
    assert NpzDay(str(tmp_path), 0).sizes == SIZES
    with pytest.raises(FileExistsError, match="overwrite"):
        materialize_multihot(str(tmp_path), [0], s)


def _cfg(path: Path, fmt: str, **over: object) -> DataConfig:
    base: Dict[str, object] = {"format": fmt, "path": str(path), "train_days": [0, 1], "eval_day": 2,
                               "batch_size": 8, "eval_batch_size": 16}
    return DataConfig(**{**base, **over})  # type: ignore[arg-type]


def _assert_same_batches(a: DataConfig, b: DataConfig, world_size: int = 2) -> int:
    checked = 0
    for split in ("train", "val", "test"):
        assert count_rows(a, split) == count_rows(b, split)
        for rank in range(world_size):
            for x, y in zip(make_batches(a, split, rank, world_size), make_batches(b, split, rank, world_size),
                            strict=True):
                assert x.sparse_features.keys() == y.sparse_features.keys()
                assert x.sparse_features.values().dtype == y.sparse_features.values().dtype
                assert x.sparse_features.values().equal(y.sparse_features.values())
                assert x.sparse_features.lengths().equal(y.sparse_features.lengths())
                assert x.dense_features.equal(y.dense_features) and x.labels.equal(y.labels)
                checked += 1
    return checked


@pytest.mark.parametrize("distribution", ["uniform", "pareto"])
def test_on_the_fly_equals_materialised(tmp_path: Path, distribution: str) -> None:
    one_hot, npz = tmp_path / "one_hot", tmp_path / "npz"
    one_hot.mkdir()
    write_one_hot_days(one_hot)
    mh = {"multi_hot_sizes": SIZES, "num_embeddings_per_feature": TABLES, "multi_hot_distribution": distribution}
    materialize_multihot(str(one_hot), [0, 1, 2], spec(distribution=distribution), out_dir=str(npz))
    assert sorted(os.listdir(npz)) == sorted(f"day_{d}_{k}" for d in range(3)
                                             for k in ("dense.npy", "labels.npy", "sparse_multi_hot.npz"))
    fly = _cfg(one_hot, "npy", **mh)
    stored = _cfg(npz, "npz")
    assert _assert_same_batches(fly, stored) > 20
    assert pooling_factors(fly) == pooling_factors(stored) == [float(s) for s in SIZES]
    batch = next(make_batches(fly, "train", 0, 1))
    assert batch.sparse_features.lengths().view(26, 8)[20].tolist() == [20] * 8
    assert pooling_factors(_cfg(one_hot, "npy")) == [1.0] * 26  # one-hot unless asked


def test_npz_format_expands_missing_days_on_the_fly(tmp_path: Path) -> None:
    write_one_hot_days(tmp_path)
    mh = {"multi_hot_sizes": SIZES, "num_embeddings_per_feature": TABLES}
    with pytest.raises(FileNotFoundError, match=r"day_0_sparse_multi_hot\.npz.*data\.multi_hot_sizes"):
        count_rows(_cfg(tmp_path, "npz"), "train")
    fly = _cfg(tmp_path, "npz", **mh)
    expected = [b.sparse_features.values() for b in make_batches(fly, "train", 0, 1)]
    materialize_multihot(str(tmp_path), [1], spec())  # day 1 stored, days 0 and 2 still expanded
    assert pooling_factors(fly) == [float(s) for s in SIZES]
    assert [b.sparse_features.values().tolist() for b in make_batches(fly, "train", 0, 1)] == \
        [v.tolist() for v in expected]
    _assert_same_batches(fly, _cfg(tmp_path, "npy", **mh))
    wrong = dict(mh, multi_hot_sizes=[1] * 26)
    with pytest.raises(ValueError, match=r"day_1_sparse_multi_hot\.npz: holds \[3, 2, 1"):
        count_rows(_cfg(tmp_path, "npz", **wrong), "train")


def test_table_sizes_from_the_manifest(tmp_path: Path) -> None:
    write_one_hot_days(tmp_path)
    cfg = _cfg(tmp_path, "npy", multi_hot_sizes=SIZES)
    with pytest.raises(ValueError, match="data.num_embeddings_per_feature"):
        pooling_factors(cfg)
    (tmp_path / "manifest.json").write_text(json.dumps({"num_embeddings_per_feature": TABLES}))
    _assert_same_batches(cfg, _cfg(tmp_path, "npy", multi_hot_sizes=SIZES, num_embeddings_per_feature=TABLES), 1)


def test_negative_one_hot_ids_are_rejected(tmp_path: Path) -> None:
    sparse = write_one_hot_days(tmp_path, days=1)
    sparse[0][9, 4] = -3
    np.save(tmp_path / "day_0_sparse.npy", sparse[0])
    with pytest.raises(ValueError, match=r"day_0_sparse\.npy: row 9 column 4: id -3 is negative"):
        materialize_multihot(str(tmp_path), [0], spec())
