"""`compactrec compare` and CLI argument handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.commands.cli import main


def _run(dir_: Path, kind: str, auc: float, total: int, ratio: float) -> Path:
    dir_.mkdir(parents=True)
    metrics = {"embeddings": kind, "memory": {"total_bytes": total, "compression_ratio": ratio},
               "val": {"auc": auc, "logloss": 0.5, "oracle_auc": 0.83}, "test": {"auc": auc - 0.01},
               "samples_per_s": 1000.0}
    (dir_ / "metrics.json").write_text(json.dumps(metrics))
    return dir_


def test_compare_prints_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = _run(tmp_path / "default", "full", 0.80, 1_000_000, 1.0)
    mem = _run(tmp_path / "memrec_small", "memrec", 0.79, 10_000, 100.0)
    assert main(["compare", str(full), str(mem)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "memrec" in out[3] and "100.0x" in out[3] and "-0.0100" in out[3] and "10,000" in out[3]


def test_compare_missing_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err


def test_overrides_after_options_and_unknown_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "configs/default.yaml", "--world-size", "2", "--local-world-size", "2", "--bogus"])
    # a bad override after the options is still checked strictly
    assert main(["plan", "configs/criteo_tb_dlrmv2.yaml", "--world-size", "2", "--local-world-size", "2",
                 "training.epochz=1"]) == 2
    assert "training.epochz" in capsys.readouterr().err
