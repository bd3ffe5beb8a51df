"""Sharder of ``embeddings.qr.QREmbeddingBagCollection`` (sharded module: ``sharding.remap``)."""

from __future__ import annotations

from typing import Type

from embeddings.qr import QREmbeddingBagCollection
from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder


class QREmbeddingBagCollectionSharder(RemappedEmbeddingBagCollectionSharder):
    """QR trick: the stacked quotient and remainder tables, row-wise on the fused TBE kernel by default."""

    @property
    def module_type(self) -> Type[QREmbeddingBagCollection]:  # type: ignore[override]
        return QREmbeddingBagCollection


register_sharder(QREmbeddingBagCollection, QREmbeddingBagCollectionSharder)
