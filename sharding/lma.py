"""Sharder of ``embeddings.lma.LmaEmbeddingBagCollection`` (sharded module: ``sharding.remap``).

The shared ``[rows, Z]`` array(s) are sharded row-wise by TorchRec's EBC sharder (fused TBE, optimizer in
backward); the minhash dictionary (sorted value keys + per-chunk rows) is a replicated buffer that the
sharded module loads from ``embeddings.options.index_path`` on every rank, and the id -> row lookup runs in
``input_dist`` so row-wise bucketing routes on the LMA rows.
"""

from __future__ import annotations

from typing import Type

from embeddings.lma import LmaEmbeddingBagCollection
from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder


class LmaEmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """LMA: the shared array(s) row-wise (table_row_wise across nodes) on the fused TBE kernel."""

    @property
    def module_type(self) -> Type[LmaEmbeddingBagCollection]:  # type: ignore[override]
        return LmaEmbeddingBagCollection


register_sharder(LmaEmbeddingBagCollection, LmaEmbeddingBagCollectionSharder)
