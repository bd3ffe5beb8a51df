"""The synthetic Criteo Terabyte layout (``tb-tiny``) on disk exactly as MLPerf DLRMv2 / TorchRec lay it out."""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

from trainer.data.data_config import DataConfig
from trainer.data.loader import count_rows, make_batches, pooling_factors
from trainer.data.multihot import MLPERF_MULTI_HOT_SIZES
from trainer.data.npy import NpyDay
from trainer.data.npz import NpzDay
from trainer.data.synthetic import SyntheticConfig, generate, preset_config
from trainer.data.synthetic.terabyte import ROLE_OF_COLUMN, TERABYTE_CARDINALITIES, base_cardinalities

if "table_sizes" not in {f.name for f in dataclasses.fields(SyntheticConfig)}:
    pytest.skip("needs the generator hooks for the Terabyte layout (SyntheticConfig.table_sizes)",
                allow_module_level=True)

DAYS, ROWS = 24, 2_001
VAL = math.ceil(ROWS / 2)


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tb-tiny")
    generate(preset_config("tb-tiny", write_multi_hot=True), out)
    return out


def _manifest(path: Path) -> Dict[str, Any]:
    manifest: Dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return manifest


def _cfg(path: Path, fmt: str, **over: object) -> DataConfig:
    base: Dict[str, object] = {"format": fmt, "path": str(path), "train_days": list(range(23)), "eval_day": 23,
                               "batch_size": 1024, "eval_batch_size": 256}
    return DataConfig(**{**base, **over})  # type: ignore[arg-type]


def test_preset() -> None:
    cfg = preset_config("tb-tiny")
    assert (cfg.num_days, cfg.rows_per_day, cfg.table_sizes, cfg.write_tsv) == (DAYS, ROWS, "terabyte", False)
    scaled = preset_config("tb-scaled")
    assert scaled.num_days == DAYS and scaled.total_rows == 960_000 and not scaled.write_multi_hot


def test_role_pairing() -> None:
    assert ROLE_OF_COLUMN == (2, 14, 10, 18, 6, 8, 0, 1, 5, 11, 23, 9, 16, 7, 12, 24, 19, 4, 22, 20, 15, 3, 25,
                              17, 13, 21)  # fmt: skip
    assert sorted(ROLE_OF_COLUMN) == list(range(26))
    base = base_cardinalities("terabyte")
    assert sorted(base) == sorted(TERABYTE_CARDINALITIES) and sum(base) == 204_184_588
    assert [base[r] for r in ROLE_OF_COLUMN] == list(TERABYTE_CARDINALITIES)


def test_files_exactly_as_mlperf_writes_them(tb: Path) -> None:
    names = {p.name for p in tb.iterdir()}
    for day in range(DAYS):
        assert f"day_{day}" not in names  # no raw TSV: MLPerf trains from the preprocessed files
        for kind, dtype, shape in (("dense", np.float32, (ROWS, 13)), ("sparse", np.int32, (ROWS, 26)),
                                   ("labels", np.int32, (ROWS, 1))):
            path = tb / f"day_{day}_{kind}.npy"
            with open(path, "rb") as fin:
                assert np.lib.format.read_magic(fin) == (1, 0)
                assert np.lib.format.read_array_header_1_0(fin) == (shape, False, np.dtype(dtype))
            np.load(path, mmap_mode="r", allow_pickle=False)
        npz = tb / f"day_{day}_sparse_multi_hot.npz"
        with zipfile.ZipFile(npz) as zf:
            assert zf.namelist() == [f"{f}.npy" for f in range(26)]
            assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        loaded = np.load(npz, allow_pickle=False)
        for f, size in enumerate(MLPERF_MULTI_HOT_SIZES):
            assert loaded[str(f)].dtype == np.int32 and loaded[str(f)].shape == (ROWS, size)
            assert loaded[str(f)].flags.c_contiguous
    assert names - {"manifest.json"} == set(_manifest(tb)["files"])


def test_manifest_and_table_sizes(tb: Path) -> None:
    m = _manifest(tb)
    sizes = m["num_embeddings_per_feature"]
    cfg = preset_config("tb-tiny")
    for j, n in enumerate(TERABYTE_CARDINALITIES):  # at most the scaled Terabyte size of the column
        assert 1 < sizes[j] <= max(min(n, cfg.cardinality_floor), round(n * cfg.cardinality_scale)), j
    assert sizes[0] == sizes[9] == sizes[19] == max(sizes)  # the user near-duplicates take three 40M columns
    for day in range(DAYS):
        sparse = np.load(tb / f"day_{day}_sparse.npy")
        assert (sparse >= 0).all() and (sparse < np.asarray(sizes)).all()
    assert m["table_sizes"] == {"list": "terabyte", "unscaled": list(TERABYTE_CARDINALITIES)}
    mh = m["multi_hot"]
    assert (mh["sizes"], mh["distribution"], mh["seed"], mh["min_table_size"], mh["materialized"]) == \
        (list(MLPERF_MULTI_HOT_SIZES), "uniform", 0, 0, True)
    assert mh["num_embeddings_per_feature"] == sizes and m["params"]["table_sizes"] == "terabyte"
    assert m["field_groups"]["near_duplicates"] == [["C1", "C10", "C20"]]
    assert m["column_roles"]["C1"] == "C3" and m["column_roles"]["C21"] == "C16"


def test_field_structure_follows_the_columns(tb: Path) -> None:
    """The generator's hierarchies hold between the columns the manifest names (the permutation is right)."""
    m = _manifest(tb)
    sparse = np.concatenate([np.load(tb / f"day_{d}_sparse.npy") for d in range(3)])
    col = {f"C{j + 1}": sparse[:, j] for j in range(26)}
    for finer, coarser in m["field_groups"]["functional_dependencies"]:
        f, g = col[finer], col[coarser]
        ok = (f > 0) & (g > 0)
        pairs = np.unique(np.stack([f[ok], g[ok]], axis=1), axis=0)
        assert np.unique(pairs[:, 0]).size == pairs.shape[0], (finer, coarser)


def test_readers_and_day_23_split(tb: Path) -> None:
    one_hot, multi_hot = NpyDay(str(tb), 23), NpzDay(str(tb), 23)
    assert one_hot.num_rows == multi_hot.num_rows == ROWS and one_hot.has_oracle
    assert multi_hot.sizes == list(MLPERF_MULTI_HOT_SIZES)
    for fmt in ("npy", "npz"):
        cfg = _cfg(tb, fmt)
        assert count_rows(cfg, "train") == 23 * ROWS
        assert (count_rows(cfg, "val"), count_rows(cfg, "test")) == (VAL, ROWS - VAL) == (1001, 1000)
    dense = np.load(tb / "day_23_dense.npy")
    cfg = _cfg(tb, "npz", eval_batch_size=VAL)
    (val,) = list(make_batches(cfg, "val", 0, 1))
    (test,) = list(make_batches(cfg, "test", 0, 1))
    np.testing.assert_array_equal(val.dense_features.numpy(), dense[:VAL])
    np.testing.assert_array_equal(test.dense_features.numpy()[: ROWS - VAL], dense[VAL:])
    assert int(val.valid.sum()) == VAL and int(test.valid.sum()) == ROWS - VAL  # type: ignore[union-attr]


def test_multi_hot_on_the_fly_equals_materialised(tb: Path) -> None:
    fly = _cfg(tb, "npy", multi_hot_sizes=list(MLPERF_MULTI_HOT_SIZES))  # table sizes from the manifest
    stored = _cfg(tb, "npz")
    assert pooling_factors(fly) == pooling_factors(stored) == [float(s) for s in MLPERF_MULTI_HOT_SIZES]
    batches = 0
    for split in ("train", "val", "test"):
        for rank in range(2):
            for x, y in zip(make_batches(fly, split, rank, 2), make_batches(stored, split, rank, 2), strict=True):
                assert x.sparse_features.values().equal(y.sparse_features.values())
                assert x.sparse_features.lengths().equal(y.sparse_features.lengths())
                assert x.dense_features.equal(y.dense_features) and x.labels.equal(y.labels)
                assert x.oracle_logits is not None and y.oracle_logits is not None
                assert x.oracle_logits.equal(y.oracle_logits)
                batches += 1
    assert batches == 2 * (23 * ROWS // 2048) + 2 * 2 * math.ceil(VAL / 512)
