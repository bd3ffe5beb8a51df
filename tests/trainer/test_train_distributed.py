"""2-process gloo training through the real trainer: it learns, and all ranks agree on global metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from tests.dist_utils import run_multiprocess
from tests.conftest import tiny_overrides
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _train(rank: int, world_size: int, overrides: List[str]) -> Dict[str, Any]:
    from trainer.distributed import init_distributed
    from trainer.loop import run_training

    config = load_config(REPO / "configs" / "default.yaml", overrides)
    return run_training(config, init_distributed("cpu"))


def _constant_logloss(ctr: float) -> float:
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


def test_two_ranks_learn_and_agree(tiny_dataset: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_dataset, tmp_path / "run") + ["training.evals_per_epoch=2", "training.epochs=2"]
    results = run_multiprocess(_train, world_size=2, args=(overrides,))
    r0, r1 = results
    # global metrics are computed collectively: identical on every rank
    assert r0["val"] == r1["val"] and r0["test"] == r1["test"]
    assert r0["world_size"] == 2 and r0["steps"] == len(r0["evals"]) * r0["steps"] // len(r0["evals"])
    val = r0["val"]
    n_val = math.ceil(5000 / 2)
    assert val["samples"] == n_val and r0["test"]["samples"] == 5000 - n_val  # every row exactly once
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    ctr = sum(manifest["ctr_per_day"][:3]) / 3 if "ctr_per_day" in manifest else 0.256
    # learning: clearly better than chance and than predicting the base rate
    assert val["auc"] > 0.65, val
    assert val["logloss"] < _constant_logloss(ctr) - 0.02, val
    assert val["auc"] <= val["oracle_auc"] + 0.01
    # the periodic evaluations ran (2 per epoch) and AUC improved from the first to the last
    assert len(r0["evals"]) == 4 and r0["evals"][-1]["auc"] > r0["evals"][0]["auc"]
    # rank 0 wrote the run directory
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["auc"] == val["auc"]
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
