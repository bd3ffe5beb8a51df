"""``DataConfig``: where the data is, which format, which days form each split, batch sizes (per rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

FORMATS = ("tsv", "npy", "npz")
BAD_ROW_POLICIES = ("error", "skip")
SPLITS = ("train", "val", "test")
MULTI_HOT_DISTRIBUTIONS = ("uniform", "pareto")
NUM_SPARSE_FEATURES = 26  # Criteo's categorical features (trainer/data/records.py imports torchrec; this does not)


def _default_train_days() -> List[int]:
    return [0, 1, 2, 3, 4, 5]


@dataclass
class DataConfig:
    """The ``data`` section of a run config. Layout of ``path``: see ``trainer/data/loader.py``."""

    # "tsv": raw Criteo TSV (Terabyte day_N files, or Kaggle train.txt via kaggle_file);
    # "npy": TorchRec/MLPerf one-hot day_{i}_{dense,sparse,labels}.npy;
    # "npz": MLPerf DLRMv2 multi-hot (npy dense/labels + day_{i}_sparse_multi_hot.npz; see multi_hot_sizes).
    format: str = "npy"
    # Dataset directory.
    path: str = "data/synthetic-small"
    # Days concatenated in this order form the training split.
    train_days: List[int] = field(default_factory=_default_train_days)
    # val = first ceil(N/2) rows of this day, test = the rest (MLPerf).
    eval_day: int = 6
    # Kaggle's single file, split by row count into `num_days` consecutive "days" (the first ones get one extra
    # row when it does not divide); the day indices above refer to those. With format "tsv": train.txt
    # (relative paths are taken inside `path`). With format "npy": the stem of TorchRec's
    # `npy_preproc_criteo --dataset_name criteo_kaggle` output, "train" for train_{dense,sparse,labels}.npy.
    kaggle_file: Optional[str] = None
    # Number of equal "days" a kaggle_file is cut into (DLRM protocol: 7).
    num_days: int = 7
    # False for Kaggle test.txt (39 columns, no label): labels are then -1, so such data can only be scored.
    tsv_has_label: bool = True
    # Rows per rank per training step.
    batch_size: int = 2048
    # Rows per rank per eval step.
    eval_batch_size: int = 8192
    # Malformed TSV rows: "error" raises naming file:line and column; "skip" drops them and counts reasons.
    bad_rows: str = "error"
    # Caps on per-rank batch counts (None = no cap), for quick runs.
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None  # per-rank cap on eval batches (None = the whole split)
    # MLPerf DLRMv2 multi-hot expansion of one-hot ids (trainer/data/multihot.py), 26 ids-per-sample counts,
    # e.g. the MLPerf sizes [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1].
    # With format "npy" every day is expanded on the fly; with "npz" a day whose
    # day_{i}_sparse_multi_hot.npz is absent is expanded on the fly from day_{i}_sparse.npy (a present npz
    # must have these sizes). None = one-hot as stored.
    multi_hot_sizes: Optional[List[int]] = None
    # Distribution of the extra ids: "uniform" (MLPerf) or "pareto".
    multi_hot_distribution: str = "uniform"
    # Tables with fewer rows stay one-hot (size 1). 0 = off, as in the reference that produced the MLPerf
    # data; its early prototypes used 200.
    multi_hot_min_table_size: int = 0
    # Seed of the legacy NumPy stream the extra ids are drawn from (MLPerf: 0).
    multi_hot_seed: int = 0
    # Table sizes the one-hot ids are reduced modulo before expansion (MLPerf: the 26 Terabyte sizes). None =
    # num_embeddings_per_feature of manifest.json in `path` (synthetic data). Only read with multi_hot_sizes.
    num_embeddings_per_feature: Optional[List[int]] = None
    # Id counts of the training split (`compactrec prepare` writes them when the config needs them: hot rows,
    # full's vocabulary, embeddings.table_sizes=counts). None = <path>/id_counts.npz.
    counts_path: Optional[str] = None
    # Values counted per feature at most (bounded memory: past it only the most frequent are kept, Misra-Gries).
    counts_capacity: int = 1 << 24

    def __post_init__(self) -> None:
        def bad(name: str, value: object, why: str) -> ValueError:
            return ValueError(f"data.{name}={value!r}: {why}")

        if self.format not in FORMATS:
            raise bad("format", self.format, f"must be one of {list(FORMATS)}")
        if not self.path:
            raise bad("path", self.path, "must name the dataset directory")
        if not self.train_days:
            raise bad("train_days", self.train_days, "must list at least one day")
        if any(d < 0 for d in self.train_days) or len(set(self.train_days)) != len(self.train_days):
            raise bad("train_days", self.train_days, "days must be distinct non-negative integers")
        if self.eval_day < 0:
            raise bad("eval_day", self.eval_day, "must be >= 0")
        if self.eval_day in self.train_days:
            raise bad("eval_day", self.eval_day, f"is also a training day (train_days={self.train_days})")
        if self.kaggle_file is not None:
            if self.format not in ("tsv", "npy"):
                raise bad("kaggle_file", self.kaggle_file, f"needs format 'tsv' or 'npy', not {self.format!r}")
            if self.format == "npy" and (not self.kaggle_file or "." in os.path.basename(self.kaggle_file)):
                raise bad("kaggle_file", self.kaggle_file, "with format 'npy' it is the stem of the npy files "
                          "(e.g. 'train' for TorchRec's train_{dense,sparse,labels}.npy), without a suffix")
            if self.num_days < 2:
                raise bad("num_days", self.num_days, "must be >= 2")
            top = max(self.train_days + [self.eval_day])
            if top >= self.num_days:
                raise bad("num_days", self.num_days, f"but day {top} is used (days are 0..num_days-1)")
        if not self.tsv_has_label and self.format != "tsv":
            raise bad("tsv_has_label", self.tsv_has_label, f"only applies to format 'tsv', not {self.format!r}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise bad(name, getattr(self, name), "must be > 0")
        if self.bad_rows not in BAD_ROW_POLICIES:
            raise bad("bad_rows", self.bad_rows, f"must be one of {list(BAD_ROW_POLICIES)}")
        for name in ("limit_train_batches", "limit_eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(name, value, "must be None or >= 0")
        for name in ("multi_hot_sizes", "num_embeddings_per_feature"):
            value = getattr(self, name)
            if value is not None and (len(value) != NUM_SPARSE_FEATURES or any(v < 1 for v in value)):
                raise bad(name, value, f"must be None or {NUM_SPARSE_FEATURES} integers >= 1")
        if self.multi_hot_sizes is not None and self.format == "tsv":
            raise bad("multi_hot_sizes", self.multi_hot_sizes, "needs format 'npy' or 'npz', not 'tsv'")
        if self.multi_hot_distribution not in MULTI_HOT_DISTRIBUTIONS:
            raise bad("multi_hot_distribution", self.multi_hot_distribution,
                      f"must be one of {list(MULTI_HOT_DISTRIBUTIONS)}")
        if self.multi_hot_min_table_size < 0:
            raise bad("multi_hot_min_table_size", self.multi_hot_min_table_size, "must be >= 0")
        if self.counts_capacity < 1:
            raise bad("counts_capacity", self.counts_capacity, "must be >= 1")
        if self.counts_path is not None and not self.counts_path:
            raise bad("counts_path", self.counts_path, "must be a path or null")
        if not 0 <= self.multi_hot_seed < 2**32:
            raise bad("multi_hot_seed", self.multi_hot_seed, "must be in [0, 2**32)")
