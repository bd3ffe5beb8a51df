"""Sharder of ``embeddings.robe.RobeEmbeddingBagCollection`` (see ``sharding.remap`` for the sharded module)."""

from __future__ import annotations

from typing import Type

from embeddings.robe import RobeEmbeddingBagCollection
from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder


class RobeEmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """ROBE-Z: the shared ``[rows, Z]`` array(s) row-wise on the fused TBE kernel."""

    @property
    def module_type(self) -> Type[RobeEmbeddingBagCollection]:  # type: ignore[override]
        return RobeEmbeddingBagCollection


register_sharder(RobeEmbeddingBagCollection, RobeEmbeddingBagCollectionSharder)
