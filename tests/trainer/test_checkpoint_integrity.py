"""Checkpoints that prove they are intact: COMPLETE.json records the sha256 of every file of the checkpoint;
a damaged file is an error naming it, `resume=latest` passes over a damaged newest checkpoint to the previous
intact one (and still ends bitwise where an uninterrupted run ends), and the RNG files are read with
`torch.load(weights_only=True)`, so a crafted one runs no code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Tuple

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from tests.trainer.test_checkpoint import EXTRA, PRESET, REPO, _assert_same_state, _train
from embeddings.integrity import file_sha256
from trainer.config import load_config
from trainer.serve.export import export_checkpoint
from trainer.train.checkpoint import (MARKER, CheckpointDamagedError, latest_checkpoint,
                                      list_checkpoints, load_checkpoint, read_metadata, verify_checkpoint)
from trainer.train.distributed import DistContext

COMMON = EXTRA + ["training.checkpoint_every=4", "training.keep_checkpoints=3"]


def _flip_middle(path: Path, nbytes: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2 - nbytes // 2
    for i in range(middle, middle + nbytes):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _config_and_ctx(overrides: Any) -> Tuple[Any, DistContext]:
    return (load_config(REPO / "configs" / PRESET, overrides),
            DistContext(0, 2, 0, 2, torch.device("cpu"), "gloo"))


class _MakesADirectory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def test_damaged_shard_is_named_and_resume_falls_back_to_the_previous_checkpoint(
        tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, tmp_path / "full") + COMMON,))
    run = tmp_path / "half"
    overrides = tiny_overrides(tiny_dataset, run) + COMMON
    run_multiprocess(_train, 2, args=(overrides + ["training.max_steps=8"],))
    step_4, step_8 = list_checkpoints(run)
    assert step_8.name == "step_8"
    files = read_metadata(step_8)["files"]
    assert {"config.yaml", ".metadata", "rank_0.pt", "rank_1.pt"} <= set(files)
    shards = sorted(n for n in files if n.endswith(".distcp"))
    assert shards and all(files[n] == file_sha256(step_8 / n) for n in files)
    assert latest_checkpoint(run) == step_8  # intact

    shard = step_8 / shards[0]
    _flip_middle(shard)
    with pytest.raises(CheckpointDamagedError, match=rf"{shard}: sha256 .*resume from the previous checkpoint"):
        verify_checkpoint(step_8)
    config, ctx = _config_and_ctx(overrides)
    with pytest.raises(CheckpointDamagedError, match=rf"{shard}: sha256"):  # before any state is touched
        load_checkpoint(step_8, None, None, config, ctx)  # type: ignore[arg-type]
    with pytest.raises(CheckpointDamagedError, match=rf"{shard}: sha256"):
        export_checkpoint(config, tmp_path / "model.pt", checkpoint_dir=step_8)
    assert not (tmp_path / "model.pt").exists()
    with caplog.at_level(logging.WARNING, logger="trainer.train.checkpoint"):
        assert latest_checkpoint(run) == step_4
    assert str(shard) in caplog.text

    resumed = run_multiprocess(_train, 2, args=(overrides + ["training.resume=latest"],))
    assert full[0]["result"]["steps"] == resumed[0]["result"]["steps"] == 12
    for rank in range(2):
        _assert_same_state(full[rank]["state"], resumed[rank]["state"])
        f, r = full[rank]["result"], resumed[rank]["result"]
        assert f["val"] == r["val"] and f["test"] == r["test"]
    verify_checkpoint(step_8)  # written again by the resumed run
    assert [p.name for p in list_checkpoints(run)] == ["step_4", "step_8", "step_12"]

    # a crafted RNG file whose pickle would create a directory: refused, nothing created, whether or not the
    # marker's checksums were rewritten to match it
    crafted = tmp_path / "crafted"
    shutil.copytree(run / "checkpoints" / "step_12", crafted)
    target = tmp_path / "created_by_the_pickle"
    torch.save({"python": _MakesADirectory(str(target))}, crafted / "rank_0.pt")
    with pytest.raises(CheckpointDamagedError, match=r"rank_0\.pt: sha256"):
        load_checkpoint(crafted, None, None, config, ctx)  # type: ignore[arg-type]
    meta = json.loads((crafted / MARKER).read_text())
    meta["files"]["rank_0.pt"] = file_sha256(crafted / "rank_0.pt")
    (crafted / MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointDamagedError, match=r"rank_0\.pt: not an RNG state of this code, refused"):
        load_checkpoint(crafted, None, None, config, ctx)  # type: ignore[arg-type]
    assert not target.exists()
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        torch.load(crafted / "rank_0.pt", weights_only=True)
    assert not target.exists()


def test_a_marker_without_checksums_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "step_4"
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps({"format_version": 2}))
    with pytest.raises(CheckpointDamagedError, match="records no sha256"):
        verify_checkpoint(path)
    (path / MARKER).write_text("{not json")
    with pytest.raises(CheckpointDamagedError, match="not valid JSON"):
        verify_checkpoint(path)
    # every complete checkpoint damaged: the newest is still returned (loading it names the file, and a
    # fresh run refuses to overwrite it)
    assert latest_checkpoint(tmp_path) == path
