"""``full``: the uncompressed reference, one table per feature.

Two ways to give ids rows (``embeddings.options.ids``):

- ``mod`` (default): a plain TorchRec EmbeddingBagCollection; raw ids are reduced into each table with
  ``id mod rows`` by the data path, the capping the MLPerf v1 loader applies (contiguous-id data, TorchRec/MLPerf
  npy, is unchanged by it). On raw ids with ``rows`` = distinct values, distinct values share rows.
- ``vocabulary``: the true uncompressed model on raw ids: every distinct training value (``compactrec
  prepare``'s id counts) has a row of its own, and every value never seen in training shares row 0 of its
  feature's table. Built as the hashing trick's layout with every counted value hot and one hashed row per
  feature (``embeddings.hashing_trick``), so the tables are a stock EmbeddingBagCollection behind an exact
  sorted-key lookup (8 bytes per value, reported as a buffer). Table sizes are then the counted distinct
  values + 1 (``embeddings.table_sizes: counts`` makes them the sizes every compression ratio refers to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embeddings.remap import RemappedEmbeddingBagCollection
from embeddings.hashing_trick import HashLayout, HashOptions
from embeddings.hot_rows import HotSet
from embeddings.inference_state import default_hooks
from embeddings.types import (
    MemoryReport,
    SparseArchContext,
    SparseArchSpec,
    TopologyInfo,
    full_table_bytes,
    optimizer_state_bytes,
    table_memory,
)


logger = logging.getLogger(__name__)
ID_MODES = ("mod", "vocabulary")


@dataclass
class FullOptions:
    """Options of the ``full`` method.

    - ``pooling``: "sum" or "mean" over the ids of a multi-hot bag.
    - ``ids``: "mod" (ids reduced mod the table rows by the data path) or "vocabulary" (every distinct training
      value its own row, unseen values one shared row; needs ``compactrec prepare``'s id counts).
    """

    pooling: str = "sum"
    ids: str = "mod"

    def __post_init__(self) -> None:
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"embeddings.options.pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.ids not in ID_MODES:
            raise ValueError(f"embeddings.options.ids must be one of {', '.join(map(repr, ID_MODES))}, got {self.ids!r}")

    @property
    def needs_id_counts(self) -> bool:
        return self.ids == "vocabulary"

    @property
    def needs_table_sizes(self) -> bool:
        return self.ids == "mod"


def table_name(feature: str) -> str:
    return f"t_{feature}"


def build(ctx: SparseArchContext, options: FullOptions) -> nn.Module:
    if options.ids == "vocabulary":
        return VocabularyEmbeddingBagCollection(ctx, options)
    pooling = PoolingType.SUM if options.pooling == "sum" else PoolingType.MEAN
    tables = [
        EmbeddingBagConfig(
            name=table_name(feature),
            embedding_dim=ctx.embedding_dim,
            num_embeddings=int(rows),
            feature_names=[feature],
            pooling=pooling,
        )
        for feature, rows in zip(ctx.feature_names, ctx.table_sizes("full with ids 'mod'"))
    ]
    return EmbeddingBagCollection(tables=tables, device=ctx.device)


class VocabularyEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """The full tables over a vocabulary of the training values (see the module doc); KJT of raw ids in."""

    def __init__(self, ctx: SparseArchContext, options: FullOptions) -> None:
        layout = HashLayout(ctx, HashOptions(num_rows=1, pooling=options.pooling), table_prefix="t")
        layout.method = "full (vocabulary)"
        if ctx.hot is not None:  # rebuilt from an inference artifact: the vocabulary it stored
            layout.set_hot(ctx.hot)
        else:
            layout.set_hot(self._vocabulary(ctx))
        super().__init__(layout, ctx.device, ctx.all_pooling_factors())

    @staticmethod
    def _vocabulary(ctx: SparseArchContext) -> HotSet:
        counts = ctx.id_counts
        if counts is None:
            raise ValueError("embeddings.options.ids='vocabulary' needs the id counts of the training data: run "
                             "`compactrec prepare CONFIG` (it writes data.counts_path)")
        inexact = [n for n, exact in zip(counts.feature_names, counts.exact) if not exact and n in ctx.feature_names]
        if inexact:
            logger.warning("id counts of %s hold only the most frequent %d values (counting capacity): the "
                           "vocabulary gives rows to those, every other value shares row 0", inexact, counts.capacity)
        return HotSet.select(counts, ctx.feature_names, num_rows=sum(int(v.size) for v in counts.values))


def default_constraints(
    module: nn.Module, options: FullOptions, topology: TopologyInfo
) -> Dict[str, ParameterConstraints]:
    return {}  # the planner chooses freely; config overrides apply per table


def memory(module: nn.Module, ctx: SparseArchContext, options: FullOptions, sparse_optimizer: str) -> MemoryReport:
    if options.ids == "vocabulary":
        from embeddings.remap import remapped_memory

        return remapped_memory(module, ctx, sparse_optimizer)
    tables = [table_memory(name, p, "parameter") for name, p in module.named_parameters()]
    tables += [table_memory(name, b, "buffer") for name, b in module.named_buffers()]
    state = sum(optimizer_state_bytes(t.rows, t.cols, sparse_optimizer) for t in tables if t.kind == "parameter")
    return MemoryReport(tables=tables, optimizer_state_bytes=state, full_table_bytes=full_table_bytes(ctx))


SPEC = SparseArchSpec(
    name="full",
    options_type=FullOptions,
    build=build,
    default_constraints=default_constraints,
    memory=memory,
    ids="table",
    description="plain EmbeddingBagCollection, one table per feature (the uncompressed reference)",
    ids_for=lambda options: "raw" if options.ids == "vocabulary" else "table",
    inference=default_hooks(build),
)
