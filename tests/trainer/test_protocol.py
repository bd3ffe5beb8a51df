"""MLPerf-style protocol on a scaled run: 20 evaluations per epoch with epoch fractions, early stop at a
target AUC, structured events kept apart in mlperf.log, learning rates scaled with the global batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.config import load_config
from trainer.train.mlperf_log import read_events

REPO = Path(__file__).resolve().parents[2]


def _train(rank: int, world_size: int, overrides: List[str]) -> Dict[str, Any]:
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    return run_training(load_config(REPO / "configs" / "default.yaml", overrides), init_distributed("cpu"))


def test_twenty_evals_per_epoch_with_epoch_fractions(learnable_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(learnable_dataset, run) + ["training.evals_per_epoch=20", "data.limit_eval_batches=1",
                                                          "optimizer.reference_global_batch=1024"]
    (result,) = run_multiprocess(_train, world_size=1, args=(overrides,))
    steps = result["steps"]
    assert len(result["evals"]) == 20
    fractions = [e["epoch"] for e in result["evals"]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert fractions[0] == pytest.approx(round(steps / 20) / steps)
    # lr scaled linearly: global batch 256 vs reference 1024
    assert result["learning_rates"]["sparse"] == pytest.approx(0.1 * 256 / 1024)
    events = read_events(run / "mlperf.log")
    keys = [e["key"] for e in events]
    assert keys.count("eval_accuracy") == 20 and keys[-2:] == ["run_stop", "test_accuracy"]
    acc = [e for e in events if e["key"] == "eval_accuracy"]
    assert [e["metadata"]["epoch_num"] for e in acc] == pytest.approx(fractions)
    assert [e["value"] for e in acc] == pytest.approx([e["auc"] for e in result["evals"]])
    stop = next(e for e in events if e["key"] == "run_stop")
    assert stop["metadata"]["status"] == "success"
    assert {"global_batch_size", "train_samples", "eval_samples", "run_start"} <= set(keys)


def test_stops_at_target_auc(learnable_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(learnable_dataset, run) + ["training.evals_per_epoch=10", "training.target_auc=0.62",
                                                          "training.epochs=2"]
    (result,) = run_multiprocess(_train, world_size=1, args=(overrides,))
    assert result["target_reached"] and result["val"]["auc"] >= 0.62
    assert all(e["auc"] < 0.62 for e in result["evals"][:-1])  # stopped at the first eval that reached it
    assert len(result["evals"]) < 20 and "test" in result
    stop = next(e for e in read_events(run / "mlperf.log") if e["key"] == "run_stop")
    assert stop["metadata"]["status"] == "success"


def test_unreached_target_is_reported_as_aborted(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, run) + ["training.target_auc=0.99", "training.max_steps=3",
                                                     "training.final_test=false"]
    (result,) = run_multiprocess(_train, world_size=1, args=(overrides,))
    assert not result["target_reached"] and result["steps"] == 3
    stop = next(e for e in read_events(run / "mlperf.log") if e["key"] == "run_stop")
    assert stop["metadata"]["status"] == "aborted"
