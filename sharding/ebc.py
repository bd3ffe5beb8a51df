"""Sharder for TorchRec's EmbeddingBagCollection that offers row-based sharding on every device.

TorchRec's stock sharder omits row_wise/table_row_wise/grid_shard on CPU, which makes row-wise placement
untestable with gloo. The sharding itself is device independent (see docs/DESIGN.md), so this sharder
offers the full list everywhere. Pass the same sharder instance to the planner and to DMP.
"""

from __future__ import annotations

from typing import List

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType

ALL_SHARDING_TYPES: List[str] = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
]


class RowWiseCapableEBCSharder(EmbeddingBagCollectionSharder):
    """EmbeddingBagCollectionSharder whose sharding types include the row-based ones on CPU too."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(ALL_SHARDING_TYPES)
