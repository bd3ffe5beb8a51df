"""Raw-id methods sized in rows train without the full tables' sizes (issue 14 item 2); what needs the sizes
says so, naming how to give them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embeddings import registry
from embeddings.types import SparseArchContext
from tests.conftest import memrec_rows, tiny_overrides
from trainer.config import load_config
from trainer.prepare.dataset_info import dataset_info

FEATURES = ["a", "b"]


def _ctx() -> SparseArchContext:
    return SparseArchContext(FEATURES, None, 8, torch.device("cpu"))


@pytest.mark.parametrize("method,options", [
    ("memrec", {"num_token_rows": 50}), ("hash", {"num_rows": 20}), ("robe", {"num_rows": 40, "chunk_size": 4}),
])
def test_methods_sized_in_rows_need_no_sizes(method: str, options: dict) -> None:
    spec = registry.get(method)
    opts = spec.options_type(**options)
    assert not spec.needs_table_sizes(opts)
    module = spec.build(_ctx(), opts)
    report = spec.memory(module, _ctx(), opts, "sgd")
    assert report.full_table_bytes is None and report.compression_ratio is None and report.total_bytes > 0
    assert "unknown" in report.versus_full()


@pytest.mark.parametrize("method,options,what", [
    ("hash", {"memory_fraction": 0.1}, "memory_fraction"), ("memrec", {"budget": 0.1}, "budget"),
    ("qr", {}, "qr"), ("full", {}, "full with ids 'mod'"),
    ("robe", {"num_rows": 40, "feature_groups": [["a"], ["b"]]}, "feature groups"),
])
def test_what_needs_sizes_names_itself_and_the_fix(method: str, options: dict, what: str) -> None:
    spec = registry.get(method)
    opts = spec.options_type(**options)
    assert spec.needs_table_sizes(opts)
    with pytest.raises(ValueError, match=f"{what}.*embeddings.table_sizes: counts"):
        spec.build(_ctx(), opts)


def test_trainer_runs_without_sizes_and_reports_no_ratio(tiny_dataset: Path, tmp_path: Path) -> None:
    """A copy of the tiny log without table sizes in its manifest: memrec in rows trains, full needs sizes."""
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_dataset.iterdir():
        if f.name != "manifest.json" and f.suffix == ".npy":
            (data / f.name).symlink_to(f)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    manifest.pop("num_embeddings_per_feature")
    (data / "manifest.json").write_text(json.dumps(manifest))
    overrides = tiny_overrides(data, tmp_path / "run")
    memrec = load_config("configs/memrec_small.yaml", overrides + memrec_rows(500, 500))
    info = dataset_info(memrec)
    assert info.num_embeddings_per_feature is None and info.id_counts is None
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    result = run_training(memrec, init_distributed("cpu"))
    assert result["memory"]["compression_ratio"] is None and result["val"]["auc"] > 0.55
    assert np.isfinite(result["val"]["logloss"])
    with pytest.raises(FileNotFoundError, match="compactrec prepare"):  # full needs sizes: from the counts
        dataset_info(load_config("configs/default.yaml", overrides))
