"""``full``: the uncompressed reference, a plain TorchRec EmbeddingBagCollection (one table per feature).

Raw ids are reduced into each table with ``id mod rows`` by the data path (``ids="table"``), the same
capping the MLPerf v1 loader applies; contiguous-id data (TorchRec/MLPerf npy) is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embeddings import registry
from embeddings.types import (
    MemoryReport,
    SparseArchContext,
    SparseArchSpec,
    TopologyInfo,
    full_table_bytes,
    optimizer_state_bytes,
    table_memory,
)
from sharding.ebc import RowWiseCapableEBCSharder


@dataclass
class FullOptions:
    """Options of the ``full`` method."""

    pooling: str = "sum"  # "sum" or "mean" over the ids of a multi-hot bag

    def __post_init__(self) -> None:
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"embeddings.options.pooling must be 'sum' or 'mean', got {self.pooling!r}")


def table_name(feature: str) -> str:
    return f"t_{feature}"


def build(ctx: SparseArchContext, options: FullOptions) -> nn.Module:
    pooling = PoolingType.SUM if options.pooling == "sum" else PoolingType.MEAN
    tables = [
        EmbeddingBagConfig(
            name=table_name(feature),
            embedding_dim=ctx.embedding_dim,
            num_embeddings=int(rows),
            feature_names=[feature],
            pooling=pooling,
        )
        for feature, rows in zip(ctx.feature_names, ctx.num_embeddings_per_feature)
    ]
    return EmbeddingBagCollection(tables=tables, device=ctx.device)


def sharders(options: FullOptions) -> List[ModuleSharder[nn.Module]]:
    return [RowWiseCapableEBCSharder()]


def default_constraints(
    module: nn.Module, options: FullOptions, topology: TopologyInfo
) -> Dict[str, ParameterConstraints]:
    return {}  # the planner chooses freely; config overrides apply per table


def memory(module: nn.Module, ctx: SparseArchContext, options: FullOptions, sparse_optimizer: str) -> MemoryReport:
    tables = [table_memory(name, p, "parameter") for name, p in module.named_parameters()]
    tables += [table_memory(name, b, "buffer") for name, b in module.named_buffers()]
    state = sum(optimizer_state_bytes(t.rows, t.cols, sparse_optimizer) for t in tables if t.kind == "parameter")
    return MemoryReport(tables=tables, optimizer_state_bytes=state, full_table_bytes=full_table_bytes(ctx))


SPEC = registry.register(
    SparseArchSpec(
        name="full",
        options_type=FullOptions,
        build=build,
        sharders=sharders,
        default_constraints=default_constraints,
        memory=memory,
        ids="table",
        description="plain EmbeddingBagCollection, one table per feature (the uncompressed reference)",
    )
)
