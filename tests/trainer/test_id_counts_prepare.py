"""`compactrec prepare`'s id counts: exact on the training split whatever the format, rebuilt when stale,
refused by training when stale, and the source of table sizes and of full's vocabulary."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_overrides
from embeddings.provenance import ArtifactMismatch
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.prepare.dataset_info import dataset_info
from trainer.prepare.count_ids import count_ids, counts_path, load_checked_counts


def _config(path: Path, run: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config("configs/default.yaml", [*tiny_overrides(path, run), "embeddings.table_sizes=counts",
                                                f"data.counts_path={run.parent / 'counts.npz'}", *extra])


def test_counts_are_exact_and_format_independent(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_dataset, tmp_path / "run")
    counts = count_ids(config.data)
    sparse = np.concatenate([np.load(tiny_dataset / f"day_{d}_sparse.npy") for d in (0, 1, 2)])
    for f in range(sparse.shape[1]):
        truth = collections.Counter(sparse[:, f].tolist())
        assert counts.values[f].tolist() == sorted(truth)
        assert counts.counts[f].tolist() == [truth[v] for v in sorted(truth)]
    assert counts.provenance["rows"] == sparse.shape[0] and all(counts.exact)
    # the raw TSV days of the same log: hex tokens (a bijection of the npy ids), missing values empty (npy id 0)
    tsv = count_ids(load_config("configs/default.yaml", [*tiny_overrides(tiny_dataset, tmp_path / "r2"),
                                                          "data.format=tsv"]).data)
    assert tsv.provenance["rows"] == sparse.shape[0]
    for f in range(sparse.shape[1]):
        present = counts.values[f] != 0
        assert sorted(tsv.counts[f].tolist()) == sorted(counts.counts[f][present].tolist())


def test_prepare_builds_once_rebuilds_when_stale_and_training_refuses_stale(tiny_dataset: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_dataset, run), "embeddings.table_sizes=counts",
                 f"data.counts_path={tmp_path / 'counts.npz'}"]
    assert main(["prepare", "configs/default.yaml", *overrides]) == 0
    path = tmp_path / "counts.npz"
    assert path.is_file() and "distinct values kept" in capsys.readouterr().out
    mtime = path.stat().st_mtime_ns
    assert main(["prepare", "configs/default.yaml", *overrides]) == 0
    assert "are current" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    # other training days: training names the difference and the rebuild; prepare rebuilds
    stale = _config(tiny_dataset, run, "data.train_days=[0, 1]", "data.eval_day=2")
    with pytest.raises(ArtifactMismatch, match=r"days: built with \[0, 1, 2\], config gives \[0, 1\].*compactrec prepare"):
        load_checked_counts(stale)
    assert main(["prepare", "configs/default.yaml", *overrides, "data.train_days=[0, 1]", "data.eval_day=2"]) == 0
    assert load_checked_counts(stale).provenance["rows"] == 10_000
    # a capacity change is an option that shaped the counts
    with pytest.raises(ArtifactMismatch, match="options.capacity"):
        load_checked_counts(_config(tiny_dataset, run, "data.train_days=[0, 1]", "data.eval_day=2",
                                    "data.counts_capacity=100"))


def test_table_sizes_from_counts_or_manifest(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_dataset, tmp_path / "run")
    count_ids(config.data).save(counts_path(config.data))
    info = dataset_info(config)
    sparse = np.concatenate([np.load(tiny_dataset / f"day_{d}_sparse.npy") for d in (0, 1, 2)])
    assert info.num_embeddings_per_feature == [len(np.unique(sparse[:, f])) + 1 for f in range(26)]
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    auto = load_config("configs/default.yaml", tiny_overrides(tiny_dataset, tmp_path / "run"))
    assert dataset_info(auto).num_embeddings_per_feature == manifest["num_embeddings_per_feature"]
    assert dataset_info(auto).id_counts is None  # nothing in the config needs them


def test_missing_counts_name_the_command(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_dataset, tmp_path / "run")
    assert not os.path.exists(counts_path(config.data))
    with pytest.raises(FileNotFoundError, match="compactrec prepare CONFIG"):
        dataset_info(config)


def test_vocabulary_and_hot_rows_train_end_to_end(tiny_dataset: Path, tmp_path: Path) -> None:
    """One process through the real trainer: full over a vocabulary and the hashing trick with hot rows."""
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    results = {}
    for name, extra in {"vocab": ["embeddings.options.ids=vocabulary"],
                        "hot": ["embeddings.kind=hash", "embeddings.options.budget=0.05",
                                "embeddings.options.hot_share=0.5"]}.items():
        config = _config(tiny_dataset, tmp_path / name, *extra, "training.final_test=false")
        assert main(["prepare", "configs/default.yaml", *tiny_overrides(tiny_dataset, tmp_path / name),
                     "embeddings.table_sizes=counts", f"data.counts_path={tmp_path / 'counts.npz'}", *extra]) == 0
        results[name] = run_training(config, init_distributed("cpu"))
    full_bytes = results["vocab"]["memory"]["full_table_bytes"]
    assert results["vocab"]["memory"]["parameter_bytes"] == full_bytes  # every value a row, + 1 per feature
    assert results["hot"]["memory"]["total_bytes"] <= 0.05 * full_bytes
    for r in results.values():
        assert r["val"]["auc"] > 0.6
