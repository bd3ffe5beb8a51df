"""configs/kaggle_{10,100,1000}x.yaml: each states its budget as a fraction of the full tables' bytes, prepares
(id counts) and plans from the preset alone on a Kaggle-format train.txt, keeps that fraction of the Kaggle tables'
bytes with everything counted, and passes the pre-launch check of `compactrec train`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

from trainer.commands import cli
from trainer.commands import launcher
from trainer.config import load_config

PRESETS = {"configs/kaggle_10x.yaml": ("hash", 0.1, 0.5), "configs/kaggle_100x.yaml": ("robe", 0.01, 0.5),
           "configs/kaggle_1000x.yaml": ("robe", 0.001, 0.0)}


@pytest.fixture(scope="module")
def kaggle_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kaggle")
    with open(out / "train.txt", "wb") as f:  # a Kaggle-format file: 20,000 lines
        for day in range(4):
            f.write((tiny_dataset / f"day_{day}").read_bytes())
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_kaggle_budget_preset_prepares_plans_and_launches(preset: str, kaggle_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    kind, budget, hot = PRESETS[preset]
    where = [f"data.path={kaggle_dir}", f"data.counts_path={tmp_path / 'counts.npz'}",
             f"training.run_dir={tmp_path / 'run'}"]  # the data's location only
    config = load_config(preset, where)
    kaggle = load_config("configs/criteo_kaggle.yaml")
    assert config.embeddings.kind == kind and config.data.kaggle_file == "train.txt"
    assert config.embeddings.options["budget"] == budget and config.embeddings.options.get("hot_share", 0) == hot
    assert config.embeddings.num_embeddings_per_feature == kaggle.embeddings.num_embeddings_per_feature
    assert cli.main(["prepare", preset, *where]) == 0
    capsys.readouterr()
    assert cli.main(["plan", preset, *where, "--world-size", "2", "--local-world-size", "2", "--device", "cpu",
                     "--costs", "none"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"embedding memory ([\d,]+) B vs full tables ([\d,]+) B", out)
    assert found, out
    kept, full = (int(g.replace(",", "")) for g in found.groups())
    assert full == sum(kaggle.embeddings.num_embeddings_per_feature) * 16 * 4  # the Kaggle tables, 16 floats
    assert 0.97 * budget * full <= kept <= budget * full, (kept, full)  # the budget, everything counted
    launched: List[str] = []
    monkeypatch.setattr(launcher, "launch_local", lambda config, *a, **k: launched.append(config) or 0)
    assert cli.main(["train", preset, *where, "--nproc", "2"]) == 0, capsys.readouterr().err
    assert launched == [preset]
