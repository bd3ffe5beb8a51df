"""`compactrec train --nproc N` checks what it can before any worker starts: one `compactrec train: error: ...`
line, exit 2, no job launched (``launch_local`` is replaced by a trap) and no traceback; a run whose data gives
only a few steps warns with the numbers and the fix, before launch and in the worker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from trainer.commands import cli
from trainer.commands import launcher
from trainer.config import load_config
from trainer.commands.preflight import MIN_TRAIN_STEPS, train_steps

REPO = Path(__file__).resolve().parents[2]


def _copy(data: Path, to: Path, skip: tuple = ()) -> Path:
    """The dataset as symlinks (cheap), without the files named in ``skip``."""
    to.mkdir()
    for f in data.iterdir():
        if f.name not in skip:
            (to / f.name).symlink_to(f)
    return to


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    launched: List[str] = []

    def trap(config: str, *args: object, **kwargs: object) -> int:
        launched.append(config)
        return 0

    monkeypatch.setattr(launcher, "launch_local", trap)
    return launched


def _fails_before_launch(args: List[str], capsys: pytest.CaptureFixture[str], launched: List[str]) -> str:
    assert cli.main(["train", *args, "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compactrec train: error: ") and err.count("\n") == 1, err
    assert launched == []
    return err


def test_missing_manifest_and_table_sizes_stop_before_launch_in_a_subprocess(tiny_dataset: Path,
                                                                               tmp_path: Path) -> None:
    """The user's view: one error line on stderr, exit 2, nothing from torchx or torchrun."""
    data = _copy(tiny_dataset, tmp_path / "data", skip=("manifest.json",))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "trainer.commands.cli", "train", "configs/default.yaml", "--nproc", "2",
                           *tiny_overrides(data, tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    # no sizes anywhere: they come from the data's id counts, which `compactrec prepare` builds
    assert done.stderr.startswith(f"compactrec train: error: id counts '{data / 'id_counts.npz'}' do not exist; "
                                  "build them with `compactrec prepare"), done.stderr
    assert not (tmp_path / "run").exists() and "torchx" not in done.stdout


def test_data_problems_name_the_file(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     no_launch: List[str]) -> None:
    run = tmp_path / "run"
    err = _fails_before_launch(["configs/default.yaml", *tiny_overrides(tmp_path / "absent", run)], capsys, no_launch)
    assert "data.path" in err and "does not exist" in err
    data = _copy(tiny_dataset, tmp_path / "data", skip=("day_3_labels.npy",))
    err = _fails_before_launch(["configs/default.yaml", *tiny_overrides(data, run)], capsys, no_launch)
    assert f"{data / 'day_3_labels.npy'}: no such file" in err  # the evaluation day is checked too
    (data / "day_3_labels.npy").write_bytes(b"\x93NUMPY garbage")
    err = _fails_before_launch(["configs/default.yaml", *tiny_overrides(data, run)], capsys, no_launch)
    assert f"{data / 'day_3_labels.npy'}: not a readable .npy header" in err
    os.remove(data / "day_3_labels.npy")
    np.save(data / "day_3_labels.npy", np.zeros((7, 1), np.int32))  # another row count than the day's dense
    err = _fails_before_launch(["configs/default.yaml", *tiny_overrides(data, run)], capsys, no_launch)
    assert "row counts differ between the files of one day" in err
    tsv = _copy(tiny_dataset, tmp_path / "tsv", skip=("day_1",))
    err = _fails_before_launch(["configs/default.yaml", *tiny_overrides(tsv, run), "data.format=tsv"], capsys,
                               no_launch)
    assert f"{tsv / 'day_1'}: no such file" in err


def test_missing_lma_index_and_bad_module_options_stop_before_launch(tiny_dataset: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      no_launch: List[str]) -> None:
    overrides = tiny_overrides(tiny_dataset, tmp_path / "run")
    index = tmp_path / "none.npz"
    err = _fails_before_launch(["configs/lma_small.yaml", *overrides, f"embeddings.options.index_path={index}",
                                "embeddings.options.hot_share=0", "embeddings.table_sizes=auto"], capsys, no_launch)
    assert f"LMA index {index} does not exist; build it with `compactrec prepare configs/lma_small.yaml" in err
    err = _fails_before_launch(["configs/robe_small.yaml", *overrides, "embeddings.options.chunk_size=2",
                                "embeddings.options.hot_share=0", "embeddings.table_sizes=auto"], capsys,
                               no_launch)
    assert "multiples of 4" in err


def test_tiny_run_warns_before_launch_and_in_the_worker(tiny_dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        no_launch: List[str]) -> None:
    args = ["configs/default.yaml", f"data.path={tiny_dataset}", "data.train_days=[0, 1, 2]", "data.eval_day=3",
            f"training.run_dir={tmp_path / 'run'}"]  # the preset's batch of 1024 per rank on 15,000 rows
    assert cli.main(["train", *args, "--nproc", "2"]) == 0 and no_launch == ["configs/default.yaml"]
    err = capsys.readouterr().err
    assert ("compactrec train: warning: this run trains only 7 steps: 15,000 training rows / global batch 2,048 "
            "(data.batch_size=1,024 x 2 rank(s)) = 7 step(s) per epoch x 1 epoch(s)") in err
    assert "data.batch_size=64 gives 117 steps" in err
    # the numbers and the fix hold: 64 per rank does give >= MIN_TRAIN_STEPS steps and no warning
    fixed = train_steps(load_config(args[0], args[1:] + ["data.batch_size=64"]), 2, 15_000)
    assert fixed.total == 117 >= MIN_TRAIN_STEPS and fixed.warning is None
    # a cap the user chose is no reason to warn; the worker warns from the same computation
    assert train_steps(load_config(args[0], args[1:] + ["data.batch_size=64", "training.max_steps=5"]), 2,
                       15_000).warning is None
    assert train_steps(load_config(args[0], args[1:]), 2, 15_000).warning is not None


def test_worker_logs_the_tiny_run_warning(tiny_dataset: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    from trainer.train.distributed import DistContext
    from trainer.train.loop import _train_steps

    config = load_config("configs/default.yaml", tiny_overrides(tiny_dataset, tmp_path / "run"))
    ctx = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"),
                      backend="gloo")
    with caplog.at_level(logging.WARNING, logger="trainer.train.loop"):
        assert _train_steps(config, ctx) == (29, 29)
    assert "this run trains only 29 steps: 15,000 training rows / global batch 512" in caplog.text
