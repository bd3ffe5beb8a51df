"""Criteo Terabyte layout of the synthetic click log (MLPerf DLRMv2 protocol) and its multi-hot files.

Table sizes: the MLPerf DLRMv2 ``num_embeddings_per_feature`` (methods.md; ids capped at 40M), 24 days, days
0-22 train, day 23 split into val (first ceil(N/2) rows) and test.

Which generator field a Terabyte column shows. The generator's fields are roles fixed by ``layout.py`` (C3 =
user instance, C16 -> C4 -> C24 its coarser levels, ...), sized from the Kaggle list. Terabyte's columns are
ordered differently (its C1 has 40M rows, Kaggle's C1 1,460), so column j of a Terabyte dataset shows the
role with the same rank by table size: roles sorted by Kaggle size and columns by Terabyte size (ties by
index) are paired, and the role is sized from the Terabyte size of its column. The three user near-duplicates
and two levels of the user hierarchy thus take the five 40M columns (C1, C10, C20: user instance; C21, C22:
its coarser levels), C11 (3.07M) the user cluster, C23 (590k) the context and C12 (405k) the ad instance.
``ROLE_OF_COLUMN`` pins the pairing; the manifest records it (``column_roles``) and names fields by column.
This pairing is our choice: nothing public says which Terabyte column holds what.

Hooks this module expects (see the report that added it): ``SyntheticConfig.table_sizes`` ("kaggle" |
"terabyte") and ``write_multi_hot``; ``layout.build_layout`` sizing roles from ``base_cardinalities``; the
generator reordering each block's columns with ``column_order`` and passing the manifest through ``finish``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.multihot import MLPERF_MULTI_HOT_SIZES, MultiHotSpec, materialize_multihot

from .cardinalities import (  # noqa: F401 (re-exported)
    CAT_FIELDS, KAGGLE_CARDINALITIES, ROLE_OF_COLUMN, TABLE_SIZE_LISTS, TERABYTE_CARDINALITIES, base_cardinalities,
    check_table_sizes,
    column_order,
)

TERABYTE_DAYS = 24
TERABYTE_TRAIN_ROWS = 4_195_197_692  # days 0-22
TERABYTE_DAY23_ROWS = 178_274_637
TERABYTE_ROWS = TERABYTE_TRAIN_ROWS + TERABYTE_DAY23_ROWS
MULTI_HOT_REFERENCE = (
    "facebookresearch/dlrm torchrec_dlrm/multi_hot.py + scripts/materialize_synthetic_multihot_dataset.py "
    "(MLPerf DLRMv2); see trainer/data/multihot.py"
)


def _rename(obj: Any, names: dict[str, str]) -> Any:
    """``obj`` with every string that is a role name replaced by its column name."""
    if isinstance(obj, str):
        return names.get(obj, obj)
    if isinstance(obj, list):
        return [_rename(v, names) for v in obj]
    if isinstance(obj, dict):
        return {k: _rename(v, names) for k, v in obj.items()}
    return obj


def finish(out_dir: str | Path, manifest: dict[str, Any], table_sizes: str, write_multi_hot: bool) -> dict[str, Any]:
    """Complete a freshly generated dataset: table sizes and field names in file column order (Terabyte
    layout), the MLPerf multi-hot settings, and ``day_{i}_sparse_multi_hot.npz`` when ``write_multi_hot``.

    ``manifest`` is the generator's (role order); the returned one is what ``manifest.json`` should hold.
    """
    check_table_sizes(table_sizes)
    if table_sizes == "kaggle" and not write_multi_hot:
        return manifest
    manifest = dict(manifest)
    order = [int(r) for r in column_order(table_sizes)]
    role_sizes = [int(n) for n in manifest["num_embeddings_per_feature"]]
    sizes = [role_sizes[r] for r in order]
    if table_sizes == "terabyte":
        column_name = {CAT_FIELDS[r]: CAT_FIELDS[j] for j, r in enumerate(order)}
        manifest["num_embeddings_per_feature"] = sizes
        manifest["field_groups"] = _rename(manifest["field_groups"], column_name)
        manifest["column_roles"] = {CAT_FIELDS[j]: CAT_FIELDS[r] for j, r in enumerate(order)}
        manifest["table_sizes"] = {"list": "terabyte", "unscaled": list(TERABYTE_CARDINALITIES)}
    spec = MultiHotSpec(MLPERF_MULTI_HOT_SIZES, tuple(sizes))
    if write_multi_hot:
        files = materialize_multihot(str(out_dir), range(int(manifest["num_days"])), spec)
        manifest["files"] = sorted(set(manifest["files"]) | set(files))
    manifest["multi_hot"] = {
        "sizes": list(spec.sizes),
        "distribution": spec.distribution,
        "seed": spec.seed,
        "min_table_size": spec.min_table_size,
        "num_embeddings_per_feature": sizes,
        "materialized": write_multi_hot,
        "reference": MULTI_HOT_REFERENCE,
        "data_config": (
            "format: npz reads the day_{i}_sparse_multi_hot.npz files; format: npy with multi_hot_sizes "
            "set to these sizes expands the one-hot days to the same ids on the fly"
        ),
    }
    return manifest
