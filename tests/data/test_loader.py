"""Loader: per-rank striding, eval padding, limits, and TSV / npy / npz giving the same batches."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from tests.data.common import assert_same
from trainer.data.data_config import DataConfig
from trainer.data.loader import count_rows, feature_names, make_batches, pooling_factors
from trainer.data.records import Batch, dense_transform

DAYS = {0: 50, 1: 23, 2: 31}  # rows per day; days 0-1 train, day 2 eval (val 16 rows, test 15)
MULTI_HOT = [1 + f % 4 for f in range(26)]


def key_of(day: int, row: int) -> int:
    return day * 100_000 + row  # stored as cat_0, identifies a row in every format


def write_dataset(directory: str, seed: int = 0, oracle: bool = True) -> Dict[int, Dict[str, np.ndarray]]:
    """The same rows as raw TSV, TorchRec npy, MLPerf multi-hot npz and oracle logits."""
    rng = np.random.default_rng(seed)
    out = {}
    for day, n in DAYS.items():
        raw = rng.integers(-3, 500, (n, 13))
        missing = rng.random((n, 13)) < 0.2
        raw[missing] = 0
        ids = rng.integers(0, 2**32, (n, 26))
        ids[:, 0] = [key_of(day, i) for i in range(n)]
        labels = rng.integers(0, 2, n)
        with open(os.path.join(directory, f"day_{day}"), "w") as fout:
            for i in range(n):
                dense = ["" if missing[i, c] else str(raw[i, c]) for c in range(13)]
                fout.write("\t".join([str(labels[i])] + dense + [f"{v:08x}" for v in ids[i]]) + "\n")
        np.save(os.path.join(directory, f"day_{day}_dense.npy"), dense_transform(raw))
        np.save(os.path.join(directory, f"day_{day}_sparse.npy"), ids.astype(np.int64))
        np.save(os.path.join(directory, f"day_{day}_labels.npy"), labels.astype(np.int32).reshape(n, 1))
        multi_hot = {str(f): (ids[:, f:f + 1] % (2**31 - 8) + np.arange(s)).astype(np.int32)
                     for f, s in enumerate(MULTI_HOT)}
        np.savez(os.path.join(directory, f"day_{day}_sparse_multi_hot.npz"), **multi_hot)
        if oracle:
            np.save(os.path.join(directory, f"day_{day}_oracle_logits.npy"), rng.normal(size=n).astype(np.float32))
        out[day] = {"ids": ids, "labels": labels}
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = str(tmp_path_factory.mktemp("ds"))
    write_dataset(directory)
    return directory


def cfg(path: str, **kw: Any) -> DataConfig:
    return DataConfig(**{"path": path, "train_days": [0, 1], "eval_day": 2, "batch_size": 4, "eval_batch_size": 4,
                         **kw})


def keys(batch: Batch) -> List[int]:
    return batch.sparse_features.to_dict()["cat_0"].values().tolist()


def cat(batches: List[Batch]) -> Dict[str, Any]:
    """Concatenate per-rank batches row-wise (KJT per key) for comparison with one big batch."""
    jts = [b.sparse_features.to_dict() for b in batches]
    out: Dict[str, Any] = {
        "dense": torch.cat([b.dense_features for b in batches]), "labels": torch.cat([b.labels for b in batches]),
        "oracle": None if batches[0].oracle_logits is None else torch.cat([b.oracle_logits for b in batches]),
    }
    for k in feature_names()[1]:
        out[k] = (torch.cat([j[k].values() for j in jts]), torch.cat([j[k].lengths().long() for j in jts]))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_train_striding_union_equals_single_process(dataset: str, world: int, fmt: str) -> None:
    per_rank = [list(make_batches(cfg(dataset, format=fmt), "train", r, world)) for r in range(world)]
    single = list(make_batches(cfg(dataset, format=fmt, batch_size=4 * world), "train", 0, 1))
    train_keys = [key_of(0, i) for i in range(50)] + [key_of(1, i) for i in range(23)]
    assert len(single) == 73 // (4 * world)  # the last partial global batch is dropped
    for r, batches in enumerate(per_rank):
        assert len(batches) == len(single)
        for g, b in enumerate(batches):
            assert b.dense_features.shape == (4, 13) and b.labels.shape == (4,) and b.valid is None
            start = g * 4 * world + r * 4
            assert keys(b) == train_keys[start:start + 4]
    for g, big in enumerate(single):
        assert_same(cat([per_rank[r][g] for r in range(world)]), cat([big]))


@pytest.mark.parametrize("world,per_rank", [(2, 4), (3, 5), (4, 2), (4, 5)])
@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_every_row_once_equal_sizes(dataset: str, world: int, per_rank: int, split: str) -> None:
    expected = [key_of(2, i) for i in (range(16) if split == "val" else range(16, 31))]
    config = cfg(dataset, eval_batch_size=per_rank)
    streams = [make_batches(config, split, r, world) for r in range(world)]
    per_rank_batches = [list(s) for s in streams]
    n_batches = -(-len(expected) // (per_rank * world))
    assert [len(b) for b in per_rank_batches] == [n_batches] * world
    assert all(s.num_batches == n_batches for s in streams)
    seen: List[int] = []
    single = list(make_batches(cfg(dataset, eval_batch_size=per_rank * world), split, 0, 1))
    for g in range(n_batches):
        step = [per_rank_batches[r][g] for r in range(world)]
        assert len({b.labels.shape[0] for b in step}) == 1  # same batch size on every rank
        step_keys: List[int] = []
        for b in step:
            assert b.valid is not None and b.valid.dtype == torch.bool
            k = keys(b)
            valid = b.valid.tolist()
            assert valid == sorted(valid, reverse=True)  # padding at the end
            step_keys += [x for x, v in zip(k, valid) if v]
            assert all(x in expected for x in k)  # padding repeats real rows
        assert step_keys == [x for x, v in zip(keys(single[g]), single[g].valid.tolist()) if v]
        seen += step_keys
    assert seen == expected  # every row exactly once, in order


def test_eval_partial_with_fewer_rows_than_ranks(dataset: str) -> None:
    # val has 16 rows: 3 ranks x 5 = 15 per step, so the last step holds one row; ranks 1, 2 only pad.
    last = [list(make_batches(cfg(dataset, eval_batch_size=5), "val", r, 3))[-1] for r in range(3)]
    assert [b.valid.tolist() for b in last] == [[True], [False], [False]]  # type: ignore[union-attr]
    assert [keys(b) for b in last] == [[key_of(2, 15)]] * 3


def test_val_test_split_and_counts(dataset: str) -> None:
    c = cfg(dataset)
    assert (count_rows(c, "train"), count_rows(c, "val"), count_rows(c, "test")) == (73, 16, 15)
    t = cfg(dataset, format="tsv")
    assert (count_rows(t, "train"), count_rows(t, "val"), count_rows(t, "test")) == (73, 16, 15)
    with pytest.raises(ValueError, match="split 'eval'"):
        count_rows(c, "eval")
    with pytest.raises(ValueError, match="rank 2"):
        make_batches(c, "train", 2, 2)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_tsv_and_npy_give_identical_batches(dataset: str, split: str) -> None:
    for rank in range(2):
        from_npy = list(make_batches(cfg(dataset, format="npy"), split, rank, 2))
        from_tsv = list(make_batches(cfg(dataset, format="tsv"), split, rank, 2))
        assert len(from_npy) == len(from_tsv) > 0
        for a, b in zip(from_npy, from_tsv):
            assert a.oracle_logits is not None
            assert_same(cat([a]), cat([b]))
            assert (a.valid is None and b.valid is None) or torch.equal(a.valid, b.valid)  # type: ignore[arg-type]


def test_limits(dataset: str) -> None:
    c = cfg(dataset, limit_train_batches=2, limit_eval_batches=1)
    for fmt in ("npy", "tsv"):
        c.format = fmt
        train = make_batches(c, "train", 1, 2)
        assert len(list(train)) == 2 and (train.num_batches == 2 if fmt == "npy" else train.num_batches is None)
        val = make_batches(c, "val", 0, 2)
        assert len(list(val)) == 1 and val.num_batches == 1


def test_tsv_skip_policy_numbers_rows_alike_on_all_ranks(tmp_path: "os.PathLike[str]") -> None:
    directory = str(tmp_path)
    write_dataset(directory, oracle=False)
    path = os.path.join(directory, "day_0")
    lines = open(path).readlines()
    fields = lines[0].rstrip("\n").split("\t")
    with_nan = "\t".join(fields[:1] + ["nan"] + fields[2:]) + "\n"
    with_bad_hex = "\t".join(fields[:20] + ["qq"] + fields[21:]) + "\n"
    bad = {3: "1\t2\n", 10: with_nan, 11: with_bad_hex}
    for at in sorted(bad):
        lines.insert(at, bad[at])
    with open(path, "w") as fout:
        fout.writelines(lines)
    with pytest.raises(ValueError, match=f"{path}:4: has 2 columns"):
        list(make_batches(cfg(directory, format="tsv"), "train", 0, 2))
    c = cfg(directory, format="tsv", bad_rows="skip", batch_size=3)
    streams = [make_batches(c, "train", r, 2) for r in range(2)]
    per_rank = [list(s) for s in streams]
    assert len(per_rank[0]) == len(per_rank[1]) == 73 // 6
    union = [k for g in range(73 // 6) for r in range(2) for k in keys(per_rank[r][g])]
    assert union == ([key_of(0, i) for i in range(50)] + [key_of(1, i) for i in range(23)])[:72]
    for s in streams:
        assert dict(s.bad_row_counts) == {"column_count": 1, "dense": 1, "categorical": 1}
    assert dict(streams[-1].bad_row_counts) == {"column_count": 1, "dense": 1, "categorical": 1}


def test_pooling_factors(dataset: str, tmp_path: "os.PathLike[str]") -> None:
    assert pooling_factors(cfg(dataset)) == [1.0] * 26
    assert pooling_factors(cfg(dataset, format="npz")) == [float(s) for s in MULTI_HOT]
    assert pooling_factors(cfg(dataset, format="tsv")) == [1.0] * 26
    directory = str(tmp_path)
    write_dataset(directory, oracle=False)
    path = os.path.join(directory, "day_0")
    lines = [line.rstrip("\n").split("\t") for line in open(path)]
    for fields in lines[:10]:
        fields[14 + 2] = ""  # C3 missing in 10 of 50 rows
    with open(path, "w") as fout:
        fout.writelines("\t".join(fields) + "\n" for fields in lines)
    factors = pooling_factors(cfg(directory, format="tsv"))
    assert factors[2] == pytest.approx(0.8) and factors[:2] == [1.0, 1.0]
    assert pooling_factors(cfg(directory, format="tsv"), sample_rows=10)[2] == 0.0
    first = next(make_batches(cfg(directory, format="tsv"), "train", 0, 1))
    assert first.sparse_features.to_dict()["cat_2"].lengths().tolist() == [0, 0, 0, 0]  # empty bags


def test_kaggle_file_split_into_days(tmp_path: "os.PathLike[str]") -> None:
    directory = str(tmp_path)
    write_dataset(directory, oracle=False)
    lines = open(os.path.join(directory, "day_0")).readlines()[:23]
    with open(os.path.join(directory, "train.txt"), "w") as fout:
        fout.writelines(lines)
    c = DataConfig(format="tsv", path=directory, kaggle_file="train.txt", batch_size=4, eval_batch_size=4)
    assert (count_rows(c, "train"), count_rows(c, "val"), count_rows(c, "test")) == (20, 2, 1)  # 4,4,3,3,3,3 | 3
    train = [k for b in make_batches(c, "train", 0, 1) for k in keys(b)]
    assert train == [key_of(0, i) for i in range(20)]
    assert [keys(b) for b in make_batches(c, "test", 0, 1)] == [[key_of(0, 22)]]  # last partial batch: 1 row


def test_batch_to_keeps_extra_fields(dataset: str) -> None:
    batch = next(make_batches(cfg(dataset), "val", 0, 2))
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.valid is not None and moved.oracle_logits is not None
    assert torch.equal(moved.valid, batch.valid) and torch.equal(moved.oracle_logits, batch.oracle_logits)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.valid is not None and pinned.valid.is_pinned()


@pytest.mark.parametrize("kw,field", [
    ({"format": "parquet"}, "format"), ({"batch_size": 0}, "batch_size"), ({"eval_batch_size": -1}, "eval_batch_size"),
    ({"eval_day": 3, "train_days": [1, 3]}, "eval_day"), ({"bad_rows": "ignore"}, "bad_rows"),
    ({"train_days": []}, "train_days"), ({"train_days": [0, 0]}, "train_days"),
    ({"limit_train_batches": -1}, "limit_train_batches"), ({"kaggle_file": "train.txt"}, "kaggle_file"),
    ({"format": "tsv", "kaggle_file": "t.txt", "num_days": 5}, "num_days"), ({"tsv_has_label": False}, "tsv_has_label"),
])
def test_config_validation(kw: Dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"data.{field}="):
        DataConfig(**kw)


def test_feature_names() -> None:
    from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES

    dense, sparse = feature_names()
    assert dense == DEFAULT_INT_NAMES and sparse == DEFAULT_CAT_NAMES and len(dense) == 13 and len(sparse) == 26
    assert sparse == [f"cat_{i}" for i in range(26)]


def test_tsv_oracle_shorter_than_file(tmp_path: "os.PathLike[str]") -> None:
    directory = str(tmp_path)
    write_dataset(directory)
    np.save(os.path.join(directory, "day_1_oracle_logits.npy"), np.zeros(20, np.float32))  # day 1 has 23 lines
    with pytest.raises(ValueError, match=r"day_1: line 21 has no oracle logit"):
        list(make_batches(cfg(directory, format="tsv", batch_size=1), "train", 0, 1))
