"""Sharder of ``embeddings.hashing_trick.HashedEmbeddingBagCollection`` (sharded module: ``sharding.remap``)."""

from __future__ import annotations

from typing import Type

from embeddings.hashing_trick import HashedEmbeddingBagCollection
from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder


class HashedEmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """Hashing trick: one hashed table per feature, row-wise on the fused TBE kernel by default."""

    @property
    def module_type(self) -> Type[HashedEmbeddingBagCollection]:  # type: ignore[override]
        return HashedEmbeddingBagCollection


register_sharder(HashedEmbeddingBagCollection, HashedEmbeddingBagCollectionSharder)
