"""Faults during training never cost training state: a bad data row mid-epoch on one rank stops every rank at
the same batch with a checkpoint at that exact position (and --resume after fixing the file ends where a clean
run ends, bitwise); a non-finite loss is skipped by rolling back and replaying without that batch; a fresh run
refuses to overwrite another run's checkpoints."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch

from tests.conftest import memrec_rows, tiny_overrides
from tests.dist_utils import run_multiprocess
from tests.trainer.test_checkpoint import PRESET, REPO, _assert_same_state, _local_state, _train
from trainer.train.checkpoint import latest_checkpoint, list_checkpoints, read_metadata
from trainer.config import load_config

# 15,000 train rows / (2 ranks x 256) = 29 steps per epoch; MEM-REC with a row-wise token table
COMMON = [*memrec_rows(2000), "training.evals_per_epoch=2", "training.max_steps=20",
          "training.checkpoint_every=8", "training.keep_checkpoints=3"]


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_row_mid_epoch_saves_the_exact_position_and_resume_after_the_fix_matches_a_clean_run(
        tiny_dataset: Path, tmp_path: Path) -> None:
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    dense = data / "day_1_dense.npy"
    good = np.load(dense)
    bad = good.copy()
    # global row 5000 + 1410 = 6410 = 12 x 512 + 256 + 154: rank 1's half of global batch 12
    bad[1410, 3] = np.nan
    np.save(dense, bad)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="DataError: train data failed at train batch") as err:
        run_multiprocess(_train, 2, args=(tiny_overrides(data, run) + COMMON,))
    text = str(err.value)
    # the reader's own message travels to every rank: file, row, column
    assert re.search(r"rank 1: ValueError: \S*day_1_dense.npy: row 1410 column 3", text), text[-3000:]
    match = re.search(r"at train batch (\d+) of epoch 0 \(checkpoint written at step (\d+)", text)
    assert match is not None, text[-3000:]
    batch, step = map(int, match.groups())
    assert batch == step and 8 < step <= 12  # batches before the bad one trained (readers read ahead in chunks)
    meta = read_metadata(latest_checkpoint(run))
    assert (meta["step"], meta["step_in_epoch"]) == (step, step)
    assert [p.name for p in list_checkpoints(run)] == ["step_8", f"step_{step}"]

    np.save(dense, good)  # the fix
    # a fresh run into that directory would overwrite and prune its checkpoints: refused
    with pytest.raises(RuntimeError, match="holds checkpoints of an earlier run"):
        run_multiprocess(_train, 2, args=(tiny_overrides(data, run) + COMMON,))
    resumed = run_multiprocess(_train, 2, args=(tiny_overrides(data, run) + COMMON + ["training.resume=latest"],))
    clean = run_multiprocess(_train, 2, args=(tiny_overrides(data, tmp_path / "clean") + COMMON,))
    for rank in range(2):
        assert resumed[rank]["result"]["steps"] == clean[rank]["result"]["steps"] == 20
        _assert_same_state(resumed[rank]["state"], clean[rank]["state"])
        assert resumed[rank]["result"]["test"] == clean[rank]["result"]["test"]


def _nan_or_drop(rank: int, world_size: int, overrides: List[str], kind: Optional[str],
                 index: int) -> Dict[str, Any]:
    """Train with train batch ``index`` of epoch 0 made non-finite on rank 0 (``nan``) or left out (``drop``)."""
    import trainer.train.loop as loop
    from trainer.train.distributed import init_distributed

    original_batches, original_build = loop._batches, loop.build_sharded_model
    built: List[Any] = []

    def batches(config: Any, split: str, ctx: Any, transform: Any, skip: int = 0) -> Iterator[Any]:
        for i, batch in enumerate(original_batches(config, split, ctx, transform, skip=skip), start=skip):
            if split == "train" and i == index and kind == "drop":
                continue
            if split == "train" and i == index and kind == "nan" and ctx.rank == 0:
                batch = dataclasses.replace(batch, dense_features=torch.full_like(batch.dense_features, float("nan")))
            yield batch

    def build(*args: Any) -> Any:
        model, arch = original_build(*args)
        built.append(model)
        return model, arch

    loop._batches, loop.build_sharded_model = batches, build  # type: ignore[assignment]
    config = load_config(REPO / "configs" / PRESET, overrides)
    result = loop.run_training(config, init_distributed("cpu"))
    return {"result": result, "state": _local_state(built[0])}


def test_nonfinite_skip_rolls_back_and_equals_a_run_without_that_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    opts = ["training.evals_per_epoch=0", "training.final_test=false", *memrec_rows(2000),
            "training.checkpoint_every=4"]
    skipped = run_multiprocess(_nan_or_drop, 2, args=(
        tiny_overrides(tiny_dataset, tmp_path / "skip") + opts + ["training.max_steps=12",
                                                                   "training.on_nonfinite=skip"], "nan", 6))
    # the reference never sees batch 6: 11 updates over batches 0-5 and 7-11
    dropped = run_multiprocess(_nan_or_drop, 2, args=(
        tiny_overrides(tiny_dataset, tmp_path / "drop") + opts + ["training.max_steps=11"], "drop", 6))
    for rank in range(2):
        assert skipped[rank]["result"]["skipped_batches"] == [[0, 6]]
        assert skipped[rank]["result"]["steps"] == 12
        _assert_same_state(skipped[rank]["state"], dropped[rank]["state"])
    assert read_metadata(latest_checkpoint(tmp_path / "skip"))["skipped_batches"] == [[0, 6]]


def test_nonfinite_skip_gives_up_after_max_skips(tiny_dataset: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_dataset, tmp_path / "run") + [
        *memrec_rows(2000), "training.evals_per_epoch=0", "training.final_test=false",
        "training.max_steps=8", "training.checkpoint_every=4", "training.on_nonfinite=skip",
        "training.max_nonfinite_skips=0"]
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 3 .*max_nonfinite_skips"):
        run_multiprocess(_nan_or_drop, 2, args=(overrides, "nan", 2))


def test_resume_auto_starts_fresh_then_continues(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, run) + [
        *memrec_rows(2000), "training.evals_per_epoch=0", "training.final_test=false",
        "training.checkpoint_every=2", "training.resume=auto"]
    (first,) = run_multiprocess(_train, 1, args=(overrides + ["training.max_steps=2"],))
    assert first["result"]["steps"] == 2 and first["result"]["samples_per_s"] > 0
    first_dir = (run / "checkpoints" / "step_2").stat()
    (second,) = run_multiprocess(_train, 1, args=(overrides + ["training.max_steps=4"],))
    assert second["result"]["steps"] == 4
    # continued from step 2: a fresh start would have written step_2 again (a new directory renamed into place)
    again = (run / "checkpoints" / "step_2").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first_dir.st_ino, first_dir.st_mtime_ns)
    assert [p.name for p in list_checkpoints(run)] == ["step_2", "step_4"]


def test_on_nonfinite_skip_needs_checkpoints() -> None:
    with pytest.raises(Exception, match="on_nonfinite=skip .* needs checkpoint_every"):
        load_config(REPO / "configs" / PRESET, ["training.on_nonfinite=skip"])
    with pytest.raises(Exception, match="resume must be one of"):
        load_config(REPO / "configs" / PRESET, ["training.resume=sometimes"])


def test_bad_row_in_the_validation_split_saves_the_training_state_first(tiny_dataset: Path, tmp_path: Path) -> None:
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    dense = data / "day_3_dense.npy"  # the eval day: its first half is the validation split
    bad = np.load(dense)
    bad[100, 5] = np.inf
    np.save(dense, bad)
    run = tmp_path / "run"
    overrides = tiny_overrides(data, run) + [*memrec_rows(2000), "training.evals_per_epoch=2",
                                             "training.max_steps=20"]  # no checkpoint_every: saved anyway
    with pytest.raises(RuntimeError, match=r"DataError: val data failed at val batch 0 after training step 10 "
                                           r"\(checkpoint written at step 10\).*day_3_dense.npy: row 100 column 5"):
        run_multiprocess(_train, 2, args=(overrides,))
    meta = read_metadata(latest_checkpoint(run))
    assert (meta["step"], meta["evals"]) == (10, [])
