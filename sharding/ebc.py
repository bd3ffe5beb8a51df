"""Sharder for TorchRec's EmbeddingBagCollection that offers row-based sharding on every device.

TorchRec's stock sharder omits row_wise/table_row_wise/grid_shard on CPU, which makes row-wise placement
untestable with gloo. The sharding itself is device independent (see docs/DESIGN.md), so this sharder
offers the full list everywhere. Pass the same sharder instance to the planner and to DMP.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, TypeVar

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ParameterSharding, QuantizedCommCodecs, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sharding.registry import register_sharder

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


M = TypeVar("M", bound=nn.Module)


class InnerEBCSharder(BaseEmbeddingSharder[M]):
    """Base of the sharders of modules that wrap an inner EmbeddingBagCollection (MEM-REC, LMA, baselines).

    The inner EBC is sharded by ``ebc_sharder`` (default :class:`RowWiseCapableEBCSharder`), so lookups stay on
    fbgemm's TBE with fused optimizers; sharding types, kernels and fused params are the inner sharder's.
    Subclasses give ``module_type``, ``sharded_module_type`` (constructed as
    ``(module, params, ebc_sharder, env, device, module_fqn)``) and ``shardable_parameters``.
    """

    def __init__(
        self,
        ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder: EmbeddingBagCollectionSharder = ebc_sharder or RowWiseCapableEBCSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
        )

    def shard(self, module: M, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> Any:
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self.sharded_module_type(module, params, self._ebc_sharder, env, device, module_fqn)

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._ebc_sharder.fused_params

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)


register_sharder(EmbeddingBagCollection, RowWiseCapableEBCSharder)
