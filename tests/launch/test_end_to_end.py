"""The real entry point end to end: `compactrec train --nproc 2` launches a torchx local_cwd job, and
`torchx run ... -j 2x2` fakes two nodes (world size 4) with node-aware table_row_wise placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict:
    return dict(os.environ, PATH=str(BIN) + os.pathsep + os.environ["PATH"], PYTHONUNBUFFERED="1")


def test_compactrec_train_nproc_2_via_torchx(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [str(BIN / "compactrec"), "train", "configs/default.yaml", "--nproc", "2",
           *tiny_overrides(tiny_dataset, run), "training.epochs=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for needle in ("validation AUC", "oracle AUC", "samples/s", "embedding bytes", "2 rank(s)"):
        assert needle in out, needle
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["val"]["auc"] > 0.5


def test_torchx_two_fake_nodes_table_row_wise(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train", "-j", "2x2",
           "--config", "configs/default.yaml", *tiny_overrides(tiny_dataset, run),
           "training.max_steps=6", "training.final_test=false",
           "sharding.default_sharding_types=[table_row_wise]"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and metrics["steps"] == 6
