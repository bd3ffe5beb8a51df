"""configs/lma_kaggle.yaml: `compactrec prepare` and `compactrec train` take the preset alone (no LMA option is
repeated on either command line), on a Kaggle-format train.txt."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from embeddings.lma_index import read_header
from trainer.commands import cli
from trainer.commands import launcher
from trainer.config import load_config

PRESET = "configs/lma_kaggle.yaml"


def test_preset_prepares_and_passes_the_pre_launch_check(tiny_dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "train.txt", "wb") as out:  # a Kaggle-format file: 20,000 lines
        for day in range(4):
            out.write((tiny_dataset / f"day_{day}").read_bytes())
    where = [f"data.path={tmp_path}", f"embeddings.options.index_path={tmp_path / 'lma_index.npz'}",
             f"training.run_dir={tmp_path / 'run'}"]  # the data's location only
    config = load_config(PRESET, where)
    assert config.embeddings.kind == "lma" and config.data.kaggle_file == "train.txt"
    assert config.embeddings.num_embeddings_per_feature == load_config(
        "configs/criteo_kaggle.yaml").embeddings.num_embeddings_per_feature
    assert cli.main(["prepare", PRESET, *where]) == 0
    header = read_header(tmp_path / "lma_index.npz")
    assert (header.num_chunks, header.num_hashes, header.min_count) == (1, 2, 2)
    assert header.rows_available == 6 * 2_857 + 1  # days 0-5 of 7 "days" (20,000 = 7 x 2,857 + 1: day 0 is longer)
    launched: List[str] = []
    monkeypatch.setattr(launcher, "launch_local", lambda config, *a, **k: launched.append(config) or 0)
    capsys.readouterr()
    assert cli.main(["train", PRESET, *where, "--nproc", "2"]) == 0, capsys.readouterr().err
    assert launched == [PRESET]
