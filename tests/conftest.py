from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` synthetic click log (4 days x 5000 rows), generated once per test session."""
    from trainer.data.synthetic import generate, preset_config

    out = tmp_path_factory.mktemp("syn-tiny")
    generate(preset_config("tiny"), out)
    return out


def memrec_rows(token_rows: int = 2000, weight_rows: int | None = None) -> list[str]:
    """Overrides that size ``configs/memrec_small.yaml`` by rows instead of its byte budget with hot rows (which
    need the id counts of ``compactrec prepare``): a small, quick MEM-REC for tests of the trainer's mechanics."""
    out = ["embeddings.options.budget=null", "embeddings.options.hot_share=0", "embeddings.table_sizes=auto",
           f"embeddings.options.num_token_rows={token_rows}"]
    return out + ([f"embeddings.options.num_weight_rows={weight_rows}"] if weight_rows is not None else [])


def tiny_overrides(path: Path, run_dir: Path) -> list[str]:
    return [
        f"data.path={path}", "data.train_days=[0, 1, 2]", "data.eval_day=3", "data.batch_size=256",
        "data.eval_batch_size=1024", f"training.run_dir={run_dir}", "training.progress_bar=false",
        "training.log_every=10",
    ]


@pytest.fixture(scope="session")
def learnable_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` with 25,000 rows per day: enough rows for a DLRM to learn clearly within seconds."""
    from trainer.data.synthetic import generate, preset_config

    out = tmp_path_factory.mktemp("syn-learnable")
    generate(preset_config("tiny", rows_per_day=25_000), out)
    return out
