"""2-process gloo training through the real trainer: it learns, and all ranks agree on global metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.conftest import memrec_rows, tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _train(rank: int, world_size: int, preset: str, overrides: List[str]) -> Dict[str, Any]:
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    config = load_config(REPO / "configs" / preset, overrides)
    return run_training(config, init_distributed("cpu"))


def _constant_logloss(ctr: float) -> float:
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


CASES = {
    "full-dlrm": ("default.yaml", []),
    "full-dcn-rowwise-adagrad": ("default.yaml", ["model.arch=dlrm_dcn", "model.dcn_low_rank_dim=16",
                                                  "optimizer.sparse=rowwise_adagrad", "optimizer.sparse_lr=0.1",
                                                  "sharding.default_sharding_types=[row_wise]"]),
    "memrec": ("memrec_small.yaml", memrec_rows(2000)),
}
PLACEMENT = {"memrec": "row_wise/fused"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_learn_and_agree(case: str, learnable_dataset: Path, tmp_path: Path) -> None:
    preset, extra = CASES[case]
    overrides = tiny_overrides(learnable_dataset, tmp_path / "run") + ["training.evals_per_epoch=2"] + extra
    r0, r1 = run_multiprocess(_train, world_size=2, args=(preset, overrides))
    # global metrics are computed collectively: identical on every rank
    assert r0["val"] == r1["val"] and r0["test"] == r1["test"]
    assert r0["world_size"] == 2
    manifest = json.loads((learnable_dataset / "manifest.json").read_text())
    rows = manifest["rows_per_day"][3]
    val, test = r0["val"], r0["test"]
    assert val["samples"] == math.ceil(rows / 2) and test["samples"] == rows - math.ceil(rows / 2)  # each row once
    assert r0["steps"] == (3 * rows) // (2 * 256)  # last partial global batch dropped
    ctr = sum(manifest["ctr_per_day"][:3]) / 3
    # learning: clearly better than chance and than predicting the base rate, below the oracle
    assert val["auc"] > 0.68, val
    assert val["logloss"] < _constant_logloss(ctr) - 0.02, (val, _constant_logloss(ctr))
    assert val["auc"] < val["oracle_auc"]
    assert len(r0["evals"]) == 2 and r0["evals"][-1]["auc"] > r0["evals"][0]["auc"] - 0.005
    # rank 0 wrote the run directory
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["auc"] == val["auc"] and metrics["embeddings"] == load_config(REPO / "configs" / preset).embeddings.kind
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    if case in PLACEMENT:
        assert metrics["placement"] == {"memrec_tokens": PLACEMENT[case]}  # the weight table is never planned
