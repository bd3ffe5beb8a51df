"""Sharder of ``embeddings.full.VocabularyEmbeddingBagCollection`` (full tables over a vocabulary of raw ids;
sharded module: ``sharding.remap``). The ``mod`` form of ``full`` is a stock EmbeddingBagCollection, sharded by
``sharding.ebc.RowWiseCapableEBCSharder``."""

from __future__ import annotations

from typing import Type

from embeddings.full import VocabularyEmbeddingBagCollection
from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder


class VocabularyEmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """One table per feature; the planner places them as it would full tables (no default constraints)."""

    @property
    def module_type(self) -> Type[VocabularyEmbeddingBagCollection]:  # type: ignore[override]
        return VocabularyEmbeddingBagCollection


register_sharder(VocabularyEmbeddingBagCollection, VocabularyEmbeddingBagCollectionSharder)
