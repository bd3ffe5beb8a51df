"""Cheap checks of the files a split is read from, for the pre-launch check of ``compactrec train``.

Only headers and first lines are read (no pass over the data): every file exists; npy/npz arrays have the
dtype and shape the readers need and a size matching their header, and the files of one day agree on the row
count (the readers' own constructors check this); a TSV file is not empty and its first line parses. A Kaggle
file must have at least ``num_days`` rows. Anything found raises the reader's own error, naming the file.
"""

from __future__ import annotations

import os
from typing import List

from trainer.data import loader, tsv
from trainer.data.data_config import DataConfig
from trainer.data.multihot import NPZ_SUFFIX
from trainer.data.npy import DayName, NpyDay, day_path
from trainer.data.records import DaySource


def _days(cfg: DataConfig, split: str) -> List[int]:
    return list(cfg.train_days) if split == "train" else [cfg.eval_day]


def _open_base(cfg: DataConfig, day: DayName) -> DaySource:
    """The stored day (an on-the-fly multi-hot expansion is not built: it only reads the one-hot npy)."""
    npz = day_path(cfg.path, day, NPZ_SUFFIX)
    if cfg.format == "npz" and not os.path.exists(npz) and cfg.multi_hot_sizes is not None:
        return NpyDay(cfg.path, day)
    return loader.open_day(cfg, day, None)


def _check_tsv(path: str, has_label: bool, policy: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    if policy == "error":  # under "skip" a bad first line is allowed (it is counted and skipped)
        with open(path, "r", encoding="ascii", errors="replace", newline="\n") as fin:
            tsv.TsvParser(path, has_label, "error", log=False).parse(fin.readline(), 1)


def check_split_files(cfg: DataConfig, split: str) -> None:
    """Raise the reader's error (naming the file) if a file of ``split`` is missing or malformed."""
    if cfg.format == "tsv":
        if cfg.kaggle_file is not None:
            paths = [os.path.join(cfg.path, cfg.kaggle_file)]
        else:
            paths = [os.path.join(cfg.path, f"day_{d}") for d in _days(cfg, split)]
        for path in paths:
            _check_tsv(path, cfg.tsv_has_label, cfg.bad_rows)
        return
    if cfg.kaggle_file is not None:
        whole = _open_base(cfg, cfg.kaggle_file)
        loader.kaggle_day_starts(day_path(cfg.path, cfg.kaggle_file, "dense.npy"), whole.num_rows, cfg.num_days)
        return
    for day in _days(cfg, split):
        _open_base(cfg, day)
