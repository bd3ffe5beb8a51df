"""Named presets of :class:`SyntheticConfig` overrides.

``cardinality_scale`` follows the data size relative to Criteo Kaggle (45.84M rows), so tables are about as
over-complete for the data as Kaggle's are. ``*-control`` variants set ``semantic_strength=0``: clusters
still shape who meets whom (co-occurrence) but carry no label signal.

``tb-*`` presets: Criteo Terabyte layout (``terabyte.py``): 24 days (0-22 train, 23 val/test), table sizes
scaled from the MLPerf DLRMv2 list by the same rule, relative to Terabyte's 4,373,472,329 rows. No TSV (the
MLPerf pipeline trains from the preprocessed npy/npz files); ``write_multi_hot=true`` adds the MLPerf
multi-hot npz files (34 MB a day at 40k rows), which the loader can also expand on the fly.
"""

from __future__ import annotations

from typing import Any

from .synthetic_config import SyntheticConfig

_BASE: dict[str, dict[str, Any]] = {
    # CI: ~20k rows, about a second.
    "tiny": {"num_days": 4, "rows_per_day": 5_000, "cardinality_scale": 0.0005, "chunk_rows": 32_768},
    # Default training set: 7 days x 175k = 1.225M rows.
    "small": {"num_days": 7, "rows_per_day": 175_000, "cardinality_scale": 0.027},
    # 7 x 1.43M = 10.01M rows.
    "medium": {"num_days": 7, "rows_per_day": 1_430_000, "cardinality_scale": 0.22, "chunk_rows": 262_144},
    # 7 x 7.15M = 50.05M rows, Kaggle-sized tables.
    "large": {"num_days": 7, "rows_per_day": 7_150_000, "cardinality_scale": 1.0, "chunk_rows": 262_144},
    # Terabyte layout for tests: 24 x 2,001 = 48,024 rows (odd: the day-23 halves differ by one row).
    "tb-tiny": {"table_sizes": "terabyte", "num_days": 24, "rows_per_day": 2_001, "cardinality_scale": 1.1e-5,
                "write_tsv": False, "chunk_rows": 32_768},
    # Terabyte layout, 24 x 40k = 960k rows (2.2e-4 of Terabyte): the 40M tables get 8,800 rows.
    "tb-scaled": {"table_sizes": "terabyte", "num_days": 24, "rows_per_day": 40_000, "cardinality_scale": 2.2e-4,
                  "write_tsv": False},
}
PRESETS: dict[str, dict[str, Any]] = {}
for _name, _over in _BASE.items():
    PRESETS[_name] = dict(_over)
    PRESETS[f"{_name}-control"] = {**_over, "semantic_strength": 0.0}


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the overrides of preset ``name``; ValueError lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def preset_config(name: str, **overrides: Any) -> SyntheticConfig:
    """``SyntheticConfig`` of preset ``name`` with further field overrides (e.g. ``seed=1``)."""
    return SyntheticConfig(**{**get_preset(name), **overrides})
