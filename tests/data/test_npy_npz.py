"""Memory-mapped npy (TorchRec one-hot) and npz (MLPerf multi-hot) readers."""

from __future__ import annotations

import os
import re
from typing import Dict, List

import numpy as np
import pytest

from trainer.data.npy import NpyDay
from trainer.data.npz import NpzDay, open_npz_lazily

N = 37
SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 20, 27, 10, 3, 1, 1]


def write_day(directory: str, day: int = 0, n: int = N, seed: int = 0, sparse_dtype: type = np.int32,
              label_shape: str = "column") -> Dict[str, np.ndarray]:
    """A day in the exact TorchRec layout: dense float32 (N,13), sparse int (N,26), labels int32 (N,1)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "dense": np.log(rng.integers(2, 1000, (n, 13)).astype(np.float32)),
        "sparse": rng.integers(0, 2**31 - 1, (n, 26)).astype(sparse_dtype),
        "labels": rng.integers(0, 2, (n, 1)).astype(np.int32),
    }
    if label_shape == "flat":
        arrays["labels"] = arrays["labels"].reshape(-1)
    for name, array in arrays.items():
        np.save(os.path.join(directory, f"day_{day}_{name}.npy"), array)
    return arrays


def write_multi_hot(directory: str, day: int = 0, n: int = N, seed: int = 1) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    members = [rng.integers(0, 2**31 - 1, (n, size)).astype(np.int32) for size in SIZES]
    members[4] = np.asfortranarray(members[4])  # stored with fortran_order=True
    np.savez(os.path.join(directory, f"day_{day}_sparse_multi_hot.npz"), **{str(f): m for f, m in enumerate(members)})
    return members


def test_npy_day_reads_exact_values(tmp_path: "os.PathLike[str]") -> None:
    arrays = write_day(str(tmp_path))
    day = NpyDay(str(tmp_path), 0)
    assert day.num_rows == N and not day.has_oracle
    assert isinstance(day.sparse, np.memmap) and isinstance(day.base.dense, np.memmap)
    chunk = day.read(5, 17)
    np.testing.assert_array_equal(chunk.dense, arrays["dense"][5:17])
    np.testing.assert_array_equal(chunk.labels, arrays["labels"][5:17, 0].astype(np.float32))
    for f in range(26):
        np.testing.assert_array_equal(chunk.ids[f], arrays["sparse"][5:17, f])
        assert chunk.ids[f].dtype == np.int64
    assert chunk.lengths.shape == (26, 12) and (chunk.lengths == 1).all()
    kjt = chunk.to_batch().sparse_features
    assert kjt.to_dict()["cat_3"].values().tolist() == arrays["sparse"][5:17, 3].tolist()


@pytest.mark.parametrize("sparse_dtype,label_shape", [(np.int64, "column"), (np.int32, "flat")])
def test_npy_accepts_int64_sparse_and_flat_labels(tmp_path: "os.PathLike[str]", sparse_dtype: type,
                                                  label_shape: str) -> None:
    arrays = write_day(str(tmp_path), sparse_dtype=sparse_dtype, label_shape=label_shape)
    chunk = NpyDay(str(tmp_path), 0).read(0, N)
    np.testing.assert_array_equal(np.stack(chunk.ids, axis=1), arrays["sparse"])
    np.testing.assert_array_equal(chunk.labels, arrays["labels"].reshape(-1))


def test_oracle_logits(tmp_path: "os.PathLike[str]") -> None:
    write_day(str(tmp_path))
    oracle = np.linspace(-3, 3, N, dtype=np.float32)
    np.save(os.path.join(tmp_path, "day_0_oracle_logits.npy"), oracle)
    chunk = NpyDay(str(tmp_path), 0).read(3, 9)
    assert chunk.oracle is not None
    np.testing.assert_array_equal(chunk.oracle, oracle[3:9])
    batch = chunk.to_batch()
    assert batch.oracle_logits is not None and batch.oracle_logits.tolist() == oracle[3:9].tolist()


@pytest.mark.parametrize("name,bad,expected", [
    ("dense", np.zeros((N, 13), np.float64), "expected float32 array of shape (N, 13), found float64"),
    ("dense", np.zeros((N, 12), np.float32), "expected float32 array of shape (N, 13), found float32 array "
                                             "of shape (37, 12)"),
    ("sparse", np.zeros((N, 26), np.float32), "expected int32 or int64 array of shape (N, 26), found float32"),
    ("sparse", np.zeros((N,), np.int32), "expected int32 or int64 array of shape (N, 26)"),
    ("labels", np.zeros((N, 2), np.int32), "expected integer array of shape (N, 1) or (N,)"),
    ("labels", np.zeros((N, 1), np.float32), "expected integer array of shape (N, 1) or (N,)"),
])
def test_npy_wrong_dtype_or_shape(tmp_path: "os.PathLike[str]", name: str, bad: np.ndarray, expected: str) -> None:
    write_day(str(tmp_path))
    path = os.path.join(tmp_path, f"day_0_{name}.npy")
    np.save(path, bad)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {expected}")):
        NpyDay(str(tmp_path), 0)


def test_npy_length_mismatch(tmp_path: "os.PathLike[str]") -> None:
    write_day(str(tmp_path))
    np.save(os.path.join(tmp_path, "day_0_labels.npy"), np.zeros((N - 1, 1), np.int32))
    with pytest.raises(ValueError, match=r"row counts differ.*labels\.npy: 36"):
        NpyDay(str(tmp_path), 0)


def test_npy_missing_file(tmp_path: "os.PathLike[str]") -> None:
    write_day(str(tmp_path))
    os.remove(os.path.join(tmp_path, "day_0_sparse.npy"))
    with pytest.raises(FileNotFoundError, match="day_0_sparse.npy"):
        NpyDay(str(tmp_path), 0)


def test_npy_negative_id_and_non_finite_dense(tmp_path: "os.PathLike[str]") -> None:
    arrays = write_day(str(tmp_path))
    arrays["sparse"][20, 7] = -5
    np.save(os.path.join(tmp_path, "day_0_sparse.npy"), arrays["sparse"])
    day = NpyDay(str(tmp_path), 0)
    day.read(0, 20)  # rows before the bad one are fine: checked per chunk as read
    with pytest.raises(ValueError, match=r"day_0_sparse\.npy: row 20 column 7 \(cat_7\): id -5 is negative"):
        day.read(10, 30)
    arrays["dense"][33, 2] = np.nan
    np.save(os.path.join(tmp_path, "day_0_dense.npy"), arrays["dense"])
    with pytest.raises(ValueError, match=r"day_0_dense\.npy: row 33 column 2: value nan is not finite"):
        NpyDay(str(tmp_path), 0).read(30, 37)


def test_lazy_npz_matches_np_load(tmp_path: "os.PathLike[str]") -> None:
    members = write_multi_hot(str(tmp_path))
    path = os.path.join(tmp_path, "day_0_sparse_multi_hot.npz")
    lazy = open_npz_lazily(path)
    assert sorted(lazy, key=int) == [str(f) for f in range(26)]
    with np.load(path) as eager:
        for f in range(26):
            assert isinstance(lazy[str(f)], np.memmap)
            np.testing.assert_array_equal(lazy[str(f)], eager[str(f)])
            np.testing.assert_array_equal(lazy[str(f)], members[f])


def test_npz_day_multi_hot_kjt(tmp_path: "os.PathLike[str]") -> None:
    write_day(str(tmp_path))
    members = write_multi_hot(str(tmp_path))
    day = NpzDay(str(tmp_path), 0)
    chunk = day.read(4, 10)
    assert chunk.lengths.shape == (26, 6)
    assert chunk.lengths[:, 0].tolist() == SIZES and (chunk.lengths == chunk.lengths[:, :1]).all()
    jt = chunk.to_batch().sparse_features.to_dict()
    for f in range(26):
        assert jt[f"cat_{f}"].values().tolist() == members[f][4:10].reshape(-1).tolist()
        assert jt[f"cat_{f}"].lengths().tolist() == [SIZES[f]] * 6


def test_npz_errors(tmp_path: "os.PathLike[str]") -> None:
    write_day(str(tmp_path))
    path = os.path.join(tmp_path, "day_0_sparse_multi_hot.npz")
    members = {str(f): np.zeros((N, 2), np.int32) for f in range(26)}
    np.savez_compressed(path, **members)
    with pytest.raises(ValueError, match="compressed"):
        NpzDay(str(tmp_path), 0)
    np.savez(path, **{k: v for k, v in members.items() if k != "13"})
    with pytest.raises(ValueError, match=r"missing \['13'\]"):
        NpzDay(str(tmp_path), 0)
    np.savez(path, **{**members, "5": np.zeros((N + 1, 2), np.int32)})
    with pytest.raises(ValueError, match=r"row counts differ"):
        NpzDay(str(tmp_path), 0)
    np.savez(path, **{**members, "5": np.zeros((N, 2), np.float32)})
    with pytest.raises(ValueError, match=r"\['5'\]: expected int32 or int64"):
        NpzDay(str(tmp_path), 0)
    np.savez(path, **{**members, "9": np.full((N, 2), -1, np.int32)})
    with pytest.raises(ValueError, match=r"\['9'\]: row 0 column 0 \(cat_9\): id -1 is negative"):
        NpzDay(str(tmp_path), 0).read(0, 3)
