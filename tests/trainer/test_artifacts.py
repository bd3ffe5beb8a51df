"""Provenance of prepared artifacts: fingerprints change with the data, differences name the field."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from embeddings.provenance import ArtifactMismatch, check_provenance, differences
from trainer.prepare.fingerprint import data_fingerprint, split_files
from trainer.data.data_config import DataConfig


def _npy_days(root: Path, days: int = 3, rows: int = 4) -> None:
    for d in range(days):
        np.save(root / f"day_{d}_dense.npy", np.zeros((rows, 13), np.float32))
        np.save(root / f"day_{d}_sparse.npy", np.zeros((rows, 26), np.int32))
        np.save(root / f"day_{d}_labels.npy", np.zeros((rows, 1), np.int32))


def test_fingerprint_follows_files_and_days(tmp_path: Path) -> None:
    _npy_days(tmp_path)
    cfg = DataConfig(format="npy", path=str(tmp_path), train_days=[0, 1], eval_day=2)
    first = data_fingerprint(cfg)
    assert [f[0] for f in first["files"]] == ["day_0_sparse.npy", "day_0_dense.npy", "day_0_labels.npy",
                                               "day_1_sparse.npy", "day_1_dense.npy", "day_1_labels.npy"]
    assert data_fingerprint(cfg) == first
    # a rewritten day (other size) and other days are both differences
    np.save(tmp_path / "day_1_sparse.npy", np.zeros((5, 26), np.int32))
    changed = differences(first, data_fingerprint(cfg))
    assert len(changed) == 1 and changed[0].startswith("files:")
    other_days = DataConfig(format="npy", path=str(tmp_path), train_days=[0], eval_day=2)
    assert any(d.startswith("days:") for d in differences(first, data_fingerprint(other_days)))
    # same size, new mtime: stale too
    before = data_fingerprint(cfg)
    stat = os.stat(tmp_path / "day_0_sparse.npy")
    os.utime(tmp_path / "day_0_sparse.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert differences(before, data_fingerprint(cfg))


def test_tsv_kaggle_file_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("0\t1\n")
    cfg = DataConfig(format="tsv", path=str(tmp_path), kaggle_file="train.txt")
    assert split_files(cfg) == [str(tmp_path / "train.txt")]
    fp = data_fingerprint(cfg)
    assert fp["kaggle_file"] == "train.txt" and fp["num_days"] == 7 and fp["bad_rows"] == "error"
    with pytest.raises(FileNotFoundError, match="day_0: no such file"):
        data_fingerprint(DataConfig(format="tsv", path=str(tmp_path)))


def test_check_provenance_names_fields_and_command() -> None:
    recorded = {"options": {"seed": 0, "min_count": 2}, "source": {"rows": 10}}
    check_provenance("x.npz", recorded, {"options": {"seed": 0, "min_count": 2}, "source": {"rows": 10}}, "cmd")
    with pytest.raises(ArtifactMismatch) as err:
        check_provenance("x.npz", recorded, {"options": {"seed": 1, "min_count": 2}, "source": {"rows": 10},
                                             "extra": 1}, "compactrec prepare CONFIG", what="LMA index")
    text = str(err.value)
    assert "LMA index x.npz" in text and "options.seed: built with 0, config gives 1" in text
    assert "extra: not recorded" in text and text.endswith("Rebuild it: compactrec prepare CONFIG")
