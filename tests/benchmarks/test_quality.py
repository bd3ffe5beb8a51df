"""benchmarks/quality.py: a real sweep on the tiny log is resumable (a finished cell is never run twice), and the
report's deltas are per-seed differences against the full model of the same dataset."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]


def _quality() -> Any:
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _copy_of(tiny_dataset: Path, out: Path) -> Path:
    """The tiny log's files linked into a directory of its own: the id counts that prepare writes stay there."""
    out.mkdir()
    for f in tiny_dataset.iterdir():
        if f.suffix in (".npy", ".json"):
            (out / f.name).symlink_to(f)
    return out


def _run(data: Path, results: Path, runs: Path, *extra: str) -> str:
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "run", "--data", f"tiny={data}",
               "--budgets", "0.1", "--hot", "0.5", "--seeds", "0", "--results", str(results),
               "--runs-root", str(runs), "--extra", "data.batch_size=256", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO),
                                                                                     "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sweep_is_resumable_and_counts_every_byte(tiny_dataset: Path, tmp_path: Path) -> None:
    data = _copy_of(tiny_dataset, tmp_path / "data")
    results, runs = tmp_path / "cells.jsonl", tmp_path / "runs"
    out = _run(data, results, runs, "--methods", "full,hash")
    assert "2 cells to run (0 already" in out
    header, *records = [json.loads(line) for line in results.read_text().splitlines()]
    assert set(header["header"]) >= {"commit", "date", "machine", "load", "command"}  # the result files' header
    assert sorted(r["name"] for r in records) == ["tiny_full_s0_e1", "tiny_hash_b0.1_h0.5_s0_e1"]
    full, hash_ = sorted(records, key=lambda r: r["method"])
    assert full["full_table_bytes"] == hash_["full_table_bytes"]  # one reference: distinct training values + 1
    assert hash_["total_bytes"] <= 0.1 * hash_["full_table_bytes"] and 9.5 <= hash_["compression"] <= 10.5
    # a second sweep over a superset runs only the new cell; the finished ones are read, not run again
    mtime = (runs / "tiny_hash_b0.1_h0.5_s0_e1" / "metrics.json").stat().st_mtime_ns
    out = _run(data, results, runs, "--methods", "full,hash,robe")
    assert "1 cells to run (2 already" in out and "tiny_robe_b0.1_h0.5_s0_e1" in out
    assert (runs / "tiny_hash_b0.1_h0.5_s0_e1" / "metrics.json").stat().st_mtime_ns == mtime
    assert len(results.read_text().splitlines()) == 1 + 3  # the header and three cells


def _record(method: str, seed: int, auc: float, tag: str = "", budget: float = 0.1, epochs: int = 1) -> Dict[str, Any]:
    return {"dataset": "d", "method": method, "budget": 1.0 if method == "full" else budget, "hot": 0.5,
            "seed": seed, "epochs": epochs, "tag": tag, "auc_1": auc, "auc_best": auc + 0.001,
            "logloss_1": 0.5, "logloss_best": 0.49, "best_epoch": 1, "total_bytes": 10, "compression": 10.0,
            "optimizer_state_bytes": 10, "oracle_auc": 0.9}


def test_report_deltas_are_per_seed_against_full() -> None:
    q = _quality()
    records: List[Dict[str, Any]] = [_record("full", s, a) for s, a in [(0, 0.78), (1, 0.79), (2, 0.80)]]
    records += [_record("hash", s, a) for s, a in [(0, 0.77), (1, 0.785), (2, 0.79)]]
    records += [_record("robe", s, a, tag="z4") for s, a in [(0, 0.781), (1, 0.789)]]  # a variant, no full of its own
    rows = q.aggregate(records)
    by = {(r["method"], r["tag"]): r for r in rows}
    mean, std, n = q.delta(by[("hash", "")], q._full_of(rows, by[("hash", "")]), "auc_1")
    assert n == 3 and mean == pytest.approx(-0.25 / 30) and std == pytest.approx(0.0028867513, rel=1e-6)
    full = q._full_of(rows, by[("robe", "z4")])
    assert full is by[("full", "")]
    mean, _, n = q.delta(by[("robe", "z4")], full, "auc_1")
    assert n == 2 and mean == pytest.approx(0.0)  # only the seeds both have
    text = q.markdown(rows, 0.001)
    assert "- d robe: 10 B (10.0x, hot share 0.5)" in text and "- d hash: none; closest -0.0083" in text
