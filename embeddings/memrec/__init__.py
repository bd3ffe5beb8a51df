"""``memrec``: MEM-REC (Jha et al., ACML 2023) registered as a sparse-arch method.

Modules: :class:`MemRecEmbeddingBagCollection` (per token, drop-in for an EBC) and
:class:`MemRecPerSampleEmbeddingBag` (per sample, with :class:`MemRecPerSampleDLRM` as its head);
``options.granularity`` picks one. Ids are raw (any int64): the module hashes them.

Default placement: token tables row_wise (table_row_wise on several nodes, table_wise on a single rank where
there is nothing to split) on the fused TBE kernel, with their true pooling factors (lookups per sample) and
weightedness. The weight table is no table: a dense parameter replicated on every rank and all-reduced by DDP
(never planned; counted by :func:`memory`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints

from embeddings.budget import FLOAT_BYTES, budget_bytes, remaining, select_hot
from embeddings.hot_rows import HotSet, hot_bytes
from embeddings.inference_state import default_hooks
from embeddings.memrec.module import MemRecEmbeddingBagCollection, MemRecModuleBase
from embeddings.memrec.options import MemRecOptions
from embeddings.memrec.per_sample import MemRecPerSampleDLRM, MemRecPerSampleEmbeddingBag
from embeddings.types import (
    MemoryReport,
    SparseArchContext,
    SparseArchSpec,
    TableMemory,
    TopologyInfo,
    full_table_bytes,
    optimizer_state_bytes,
    table_memory,
)

__all__ = [
    "MemRecOptions",
    "MemRecEmbeddingBagCollection",
    "MemRecPerSampleEmbeddingBag",
    "MemRecPerSampleDLRM",
    "build",
    "sharders",
    "default_constraints",
    "memory",
    "SPEC",
]


def size_from_budget(ctx: SparseArchContext, options: MemRecOptions) -> Tuple[MemRecOptions, Optional[HotSet]]:
    """Options with D = dw resolved from ``options.budget`` (unchanged without one), and the hot set.

    A hot value costs its token row, its own weight and its lookup key; every hashed token row comes with one
    weight row (dw = D); the salts are counted too. With one table per feature, each gets the same D.
    """
    if options.budget is None:
        return options, None
    row_bytes = ctx.embedding_dim * FLOAT_BYTES
    hot = select_hot(ctx, options, row_bytes + FLOAT_BYTES)
    count = len(ctx.feature_names)
    salts = 8 * count * (options.num_token_hashes + options.num_weight_hashes)
    fixed = salts + hot_bytes(hot) + hot.total * (row_bytes + FLOAT_BYTES)
    left = remaining(budget_bytes(ctx, options.budget), fixed, "the hot rows and salts")
    tables = 1 if options.shared_tables else count
    rows = left // (tables * (row_bytes + FLOAT_BYTES))
    if rows < 1:
        raise ValueError(f"embeddings.options.budget leaves {left:,} B for {tables} token table(s) of "
                         f"{row_bytes + FLOAT_BYTES} B per row (with its weight): not one row; raise the budget")
    # the module gets explicit sizes (the budget is spent) and the hot set
    return dataclasses.replace(options, budget=None, hot_share=0.0, num_token_rows=int(rows),
                               num_weight_rows=int(rows)), hot


def build(ctx: SparseArchContext, options: MemRecOptions) -> nn.Module:
    options, hot = size_from_budget(ctx, options)
    pooling_factors = ctx.all_pooling_factors()
    if options.granularity == "per_sample":
        return MemRecPerSampleEmbeddingBag(feature_names=list(ctx.feature_names), embedding_dim=ctx.embedding_dim,
                                           options=options, device=ctx.device, pooling_factors=pooling_factors)
    return MemRecEmbeddingBagCollection(feature_names=list(ctx.feature_names), embedding_dim=ctx.embedding_dim,
                                        options=options, device=ctx.device, pooling_factors=pooling_factors, hot=hot)


def _as_memrec(module: nn.Module) -> MemRecModuleBase:
    if not isinstance(module, MemRecModuleBase):
        raise TypeError(f"expected a MEM-REC module, got {type(module).__name__}")
    return module


def default_constraints(
    module: nn.Module, options: MemRecOptions, topology: TopologyInfo
) -> Dict[str, ParameterConstraints]:
    """Token tables row-wise (table_row_wise across nodes, table_wise on one rank), fused. The weight table is
    not planned (replicated)."""
    memrec = _as_memrec(module)
    layout = memrec.layout
    factors = layout.planner_pooling_factors(memrec.pooling_factors)
    constraints: Dict[str, ParameterConstraints] = {}
    for config in memrec.embedding_bag_configs():
        constraints[config.name] = ParameterConstraints(
            sharding_types=[topology.row_sharding_type()],
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            pooling_factors=factors[config.name],
            is_weighted=layout.is_weighted,
        )
    return constraints


def memory(module: nn.Module, ctx: SparseArchContext, options: MemRecOptions, sparse_optimizer: str) -> MemoryReport:
    """Exact bytes: every token table, the weight table, the hash-salt buffers; optimizer state.

    Optimizer state is counted for the token tables under ``sparse_optimizer`` (fused) and for the
    weight table as the same optimizer kind run densely (e.g. Adagrad keeps one fp32 sum per weight).
    """
    memrec = _as_memrec(module)
    tables: List[TableMemory] = [
        table_memory(config.name, memrec.token_ebc.embedding_bags[config.name].weight, "parameter")
        for config in memrec.embedding_bag_configs()
    ]
    tables.append(table_memory(memrec.layout.weight_table_name, memrec.weight_table, "parameter"))
    tables += [table_memory(name, buffer, "buffer") for name, buffer in memrec.named_buffers()]
    state = sum(optimizer_state_bytes(t.rows, t.cols, sparse_optimizer) for t in tables if t.kind == "parameter")
    return MemoryReport(tables=tables, optimizer_state_bytes=state, full_table_bytes=full_table_bytes(ctx))


def dense_head(options: MemRecOptions) -> Optional[Callable[..., nn.Module]]:
    """The per-sample variant concatenates its one vector per sample with the bottom MLP (no dot interaction)."""
    return MemRecPerSampleDLRM if options.granularity == "per_sample" else None


SPEC = SparseArchSpec(
    name="memrec",
    options_type=MemRecOptions,
    build=build,
    default_constraints=default_constraints,
    memory=memory,
    ids="raw",
    description="MEM-REC: hashed token table scaled by a hashed scalar weight table (Jha et al. 2023)",
    dense_head=dense_head,
    inference=default_hooks(build),
)
