"""`compactrec prepare`: builds the LMA index once and keeps it while it matches; rebuilds it (logged, naming the
fields) when the data or an option that shaped it changed; `compactrec train` refuses a stale index, naming the
fields and the rebuild command; the index does not depend on the batch size."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest

from embeddings.lma_index import VERSION, load_index, save_index
from tests.conftest import tiny_overrides
from trainer.commands.cli import main
from trainer.config import load_config
from embeddings.lma_build import build_index
from trainer.prepare.run import method_artifact, training_data

PRESET = "configs/lma_small.yaml"


def _args(data: Path, tmp: Path, *extra: str) -> List[str]:
    return [PRESET, *tiny_overrides(data, tmp / "run"), f"embeddings.options.index_path={tmp / 'index.npz'}",
            "embeddings.options.sample_rows=2000",
            # the index alone (no hot rows, sizes from the manifest): these tests are about its staleness
            "embeddings.options.hot_share=0", "embeddings.table_sizes=auto", *extra]


def test_prepare_builds_lma_index_once(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index.npz"
    assert main(["prepare", *_args(tiny_dataset, tmp_path)]) == 0
    assert index.is_file() and "values covered" in capsys.readouterr().out
    mtime = index.stat().st_mtime_ns
    # another batch size shapes nothing: the index samples rows of the split, not batches
    assert main(["prepare", *_args(tiny_dataset, tmp_path, "data.batch_size=100")]) == 0
    assert "matches the config and the data: kept" in capsys.readouterr().out
    assert index.stat().st_mtime_ns == mtime


def test_index_is_the_same_for_any_batch_size(tiny_dataset: Path, tmp_path: Path) -> None:
    built = []
    for batch in (256, 7):
        config = load_config(PRESET, _args(tiny_dataset, tmp_path, f"data.batch_size={batch}",
                                           "embeddings.options.sample_rows=15000")[1:])
        built.append(build_index(method_artifact(config)[1], training_data(config)))
    a, b = built
    assert a.header.rows_sampled == a.header.rows_available == 15000  # every row, the last partial batch's too
    assert dataclasses.replace(a.header, created="") == dataclasses.replace(b.header, created="")
    for name in ("keys", "signatures", "features", "counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("change,field", [
    (["embeddings.options.min_count=1"], "options.min_count: built with 2, config gives 1"),
    (["embeddings.options.sample_rows=1000"], "options.sample_rows: built with 2000, config gives 1000"),
    (["data.train_days=[0, 1]"], "source.days: built with [0, 1, 2], config gives [0, 1]"),
    ([], "source.files"),  # a training file rewritten (its mtime moves) after the index was built
])
def test_stale_index_is_rebuilt_by_prepare_and_refused_by_train(
        tiny_dataset: Path, tmp_path: Path, change: List[str], field: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"  # a private copy: the file case touches it
    data.mkdir()
    for f in tiny_dataset.iterdir():
        (data / f.name).symlink_to(f)
    (data / "day_1_sparse.npy").unlink()
    (data / "day_1_sparse.npy").write_bytes((tiny_dataset / "day_1_sparse.npy").read_bytes())
    index = tmp_path / "index.npz"
    assert main(["prepare", *_args(data, tmp_path)]) == 0
    built = index.stat().st_mtime_ns
    if not change:
        stat = os.stat(data / "day_1_sparse.npy")
        os.utime(data / "day_1_sparse.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    args = _args(data, tmp_path, *change)
    # training (a worker, and the launcher before any worker starts) stops with the field and the command
    for train in (["train", *args], ["train", *args, "--nproc", "2"]):
        assert main(train) == 2
        err = capsys.readouterr().err
        assert err.startswith("compactrec train: error: LMA index ") and err.count("\n") == 1, err
        assert field in err and f"Rebuild it: compactrec prepare {PRESET}" in err, err
    assert index.stat().st_mtime_ns == built  # training never rebuilds
    assert main(["prepare", *args]) == 0
    out, err = capsys.readouterr()  # the CLI logs to stderr
    assert "does not match the config and the data, rebuilding it" in err and field in err, err
    assert index.stat().st_mtime_ns != built and "values covered" in out
    assert main(["prepare", *args]) == 0 and "kept" in capsys.readouterr().out


def test_index_of_an_older_format_is_rebuilt(tiny_dataset: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index.npz"
    assert main(["prepare", *_args(tiny_dataset, tmp_path)]) == 0
    old = load_index(index)
    save_index(dataclasses.replace(old, header=dataclasses.replace(old.header, version=1)), index)
    assert main(["train", *_args(tiny_dataset, tmp_path)]) == 2
    assert f"format version 1, this code reads version {VERSION}" in capsys.readouterr().err
    assert main(["prepare", *_args(tiny_dataset, tmp_path)]) == 0
    assert load_index(index).header.version == VERSION


def test_damaged_index_is_rebuilt_by_prepare(tiny_dataset: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tests.embeddings.test_integrity import _rezip_with_changed

    index = tmp_path / "index.npz"
    assert main(["prepare", *_args(tiny_dataset, tmp_path)]) == 0
    _rezip_with_changed(index, "signatures.npy")  # the header still matches the config and the data
    with pytest.raises(ValueError, match="index.npz: LMA index is damaged"):
        load_index(index)
    capsys.readouterr()
    assert main(["prepare", *_args(tiny_dataset, tmp_path)]) == 0
    assert "LMA index is damaged" in capsys.readouterr().err
    load_index(index)


def test_prepare_full_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "configs/default.yaml"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out
