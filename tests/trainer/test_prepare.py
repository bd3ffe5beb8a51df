"""`compactrec prepare`: builds the LMA index once, keeps it afterwards; a no-op for other methods."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trainer.cli import main


def test_prepare_builds_lma_index_once(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "lma_index.npz"
    args = ["prepare", "configs/lma_small.yaml", *tiny_overrides(tiny_dataset, tmp_path / "run"),
            f"embeddings.options.index_path={index}", "embeddings.options.sample_rows=2000"]
    assert main(args) == 0
    assert index.is_file() and "values covered" in capsys.readouterr().out
    mtime = index.stat().st_mtime_ns
    assert main(args) == 0
    assert "exists" in capsys.readouterr().out and index.stat().st_mtime_ns == mtime


def test_prepare_full_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "configs/default.yaml"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out
