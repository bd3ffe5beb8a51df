"""The per-field table sizes the generator scales from: Criteo Kaggle's and Criteo Terabyte's (MLPerf DLRMv2),
and which Terabyte column shows which generator role. A leaf: it imports nothing of the generator."""

from __future__ import annotations

import numpy as np

CAT_FIELDS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
DENSE_FIELDS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))

#: Criteo Kaggle per-field cardinalities (C1..C26), from methods.md.
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

TABLE_SIZE_LISTS = ("kaggle", "terabyte")
#: MLPerf DLRMv2 table sizes of Criteo Terabyte columns C1..C26 (sum 204,184,588).
TERABYTE_CARDINALITIES: tuple[int, ...] = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip


def _rank_pairing() -> tuple[int, ...]:
    """Role index shown by each Terabyte column (see the module doc)."""
    roles = sorted(range(len(CAT_FIELDS)), key=lambda i: (-KAGGLE_CARDINALITIES[i], i))
    columns = sorted(range(len(CAT_FIELDS)), key=lambda j: (-TERABYTE_CARDINALITIES[j], j))
    role_of = [0] * len(CAT_FIELDS)
    for role, column in zip(roles, columns):
        role_of[column] = role
    return tuple(role_of)


#: ROLE_OF_COLUMN[j] = index in ``layout.CAT_FIELDS`` of the role that Terabyte column j shows.
ROLE_OF_COLUMN: tuple[int, ...] = _rank_pairing()


def check_table_sizes(table_sizes: str) -> None:
    if table_sizes not in TABLE_SIZE_LISTS:
        raise ValueError(f"table_sizes={table_sizes!r}: must be one of {list(TABLE_SIZE_LISTS)}")


def base_cardinalities(table_sizes: str) -> tuple[int, ...]:
    """Unscaled table size of each role (``layout.CAT_FIELDS`` order) under the named list."""
    check_table_sizes(table_sizes)
    if table_sizes == "kaggle":
        return KAGGLE_CARDINALITIES
    sizes = [0] * len(CAT_FIELDS)
    for column, role in enumerate(ROLE_OF_COLUMN):
        sizes[role] = TERABYTE_CARDINALITIES[column]
    return tuple(sizes)


def column_order(table_sizes: str) -> np.ndarray:
    """Indices such that ``sparse[:, column_order]`` puts the roles into the file's column order."""
    check_table_sizes(table_sizes)
    return np.arange(len(CAT_FIELDS)) if table_sizes == "kaggle" else np.asarray(ROLE_OF_COLUMN)
