"""Shared pieces of the data tests: the fuzz tests' small valid dataset in every format (test_fuzz_tsv.py,
test_fuzz_arrays.py) and helpers to parse, read and compare batches (also test_loader.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from trainer.data import tsv
from trainer.data.data_config import DataConfig
from trainer.data.records import Batch, dense_transform

SEED = 20240611
DAYS = {0: 12, 1: 9, 2: 10}  # rows per day: 0 and 1 train, 2 eval (val 5 rows, test 5)
MH_SIZES = [1 + f % 3 for f in range(26)]  # multi-hot ids per sample in the npz files
DENSE_COLS = [f"I{i + 1}" for i in range(13)]
CAT_COLS = [f"C{i + 1}" for i in range(26)]
INT64_MAX = 2**63 - 1


def key_of(day: int, row: int) -> int:
    return day * 1000 + row  # stored as cat_0: identifies a row in every format


def write_dataset(directory: Path, oracle: bool = True) -> None:
    """The same rows as raw TSV, TorchRec npy, MLPerf multi-hot npz and (optionally) oracle logits."""
    rng = np.random.default_rng(SEED)
    for day, n in DAYS.items():
        raw = rng.integers(-3, 500, (n, 13))
        missing = rng.random((n, 13)) < 0.2
        raw[missing] = 0
        ids = rng.integers(0, 2**32, (n, 26))
        ids[:, 0] = [key_of(day, i) for i in range(n)]
        labels = rng.integers(0, 2, n)
        with open(directory / f"day_{day}", "w") as fout:
            for i in range(n):
                dense = ["" if missing[i, c] else str(raw[i, c]) for c in range(13)]
                fout.write("\t".join([str(labels[i])] + dense + [f"{v:08x}" for v in ids[i]]) + "\n")
        np.save(directory / f"day_{day}_dense.npy", dense_transform(raw))
        np.save(directory / f"day_{day}_sparse.npy", ids.astype(np.int64))
        np.save(directory / f"day_{day}_labels.npy", labels.astype(np.int32).reshape(n, 1))
        np.savez(directory / f"day_{day}_sparse_multi_hot.npz",
                 **{str(f): (ids[:, f:f + 1] % (2**31 - 8) + np.arange(s)).astype(np.int32)
                    for f, s in enumerate(MH_SIZES)})
        if oracle:
            np.save(directory / f"day_{day}_oracle_logits.npy", rng.normal(size=n).astype(np.float32))


def cfg(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(**{"path": str(path), "train_days": [0, 1], "eval_day": 2, "batch_size": 3,
                         "eval_batch_size": 2, **kw})


def parse(path: Path, policy: str = "error", has_label: bool = True) -> Tuple[List[tsv.Row], Dict[str, int]]:
    """Every parsed row of a TSV file and the skip counts."""
    parser = tsv.TsvParser(str(path), has_label, policy)
    rows = [row for _, _, row in tsv.iter_rows(tsv.TsvSegment(str(path)), parser, lambda j: True) if row is not None]
    return rows, dict(parser.counts)


def lines_of(path: Path) -> List[str]:
    with open(path, newline="") as fin:
        return fin.readlines()


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fout:
        fout.writelines(lines)


def batch_data(batch: Batch) -> Dict[str, Any]:
    jt = batch.sparse_features.to_dict()
    out: Dict[str, Any] = {"dense": batch.dense_features, "labels": batch.labels, "valid": batch.valid,
                           "oracle": batch.oracle_logits}
    out.update({k: (v.values(), v.lengths()) for k, v in jt.items()})
    return out


def assert_same(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    """Two dicts of tensors / (values, lengths) pairs / None are equal, key by key."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k
        elif a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            assert torch.equal(a[k], b[k]), k


def assert_same_batches(got: Sequence[Batch], expected: Sequence[Batch]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_same(batch_data(g), batch_data(e))
