"""Sharder of ``embeddings.qr.QREmbeddingBagCollection`` (sharded module: ``sharding.chunked``)."""

from __future__ import annotations

from typing import Type

from embeddings.qr import QREmbeddingBagCollection
from sharding.chunked import RemappedEmbeddingBagCollectionSharder


class QREmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """QR trick: the stacked quotient and remainder tables, row-wise on the fused TBE kernel by default."""

    @property
    def module_type(self) -> Type[QREmbeddingBagCollection]:  # type: ignore[override]
        return QREmbeddingBagCollection
