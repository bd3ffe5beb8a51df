"""``robe``: ROBE-Z random chunk allocation (Desai et al., MLSys 2022) on the chunk table of
:mod:`embeddings.chunk_table` (LMA addresses the same table by minhash): random addresses (``hash: mix``) or the
full tables laid out chunk by chunk (``hash: identity``, the degenerate setting the parity tests pin).
"""

from __future__ import annotations

from dataclasses import dataclass

from embeddings.chunk_table import ChunkedOptions, ChunkLayout, IdentityChunkAddresser
from embeddings.remap import RemappedEmbeddingBagCollection, check_choice, remapped_spec, where
from embeddings.types import SparseArchContext


@dataclass
class RobeOptions(ChunkedOptions):
    """ROBE-Z options: :class:`ChunkedOptions` plus

    - ``hash``: "mix" (random chunk addresses from the pinned hash) or "identity" (the full tables laid out
      chunk by chunk; needs at least C x the group's summed table rows; the degenerate setting parity tests pin).
    """

    hash: str = "mix"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("hash", self.hash, ("mix", "identity"))
        if self.hash == "identity" and self.hot_share > 0:
            raise ValueError(f"{where('hash')} 'identity' lays out the full tables: it takes no hot rows "
                             f"({where('hot_share')}={self.hot_share})")


class RobeEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """ROBE-Z: random chunk allocation into a shared array; drop-in for an EmbeddingBagCollection."""

    layout: ChunkLayout

    def __init__(self, ctx: SparseArchContext, options: RobeOptions, table_prefix: str = "robe") -> None:
        layout = ChunkLayout(ctx, options, table_prefix, method="robe")
        if options.hash == "identity":
            layout.addresser = IdentityChunkAddresser(layout.rows_per_group, layout.full_rows, layout.groups,
                                                      layout.num_chunks)
        super().__init__(layout, ctx.device, ctx.all_pooling_factors())


SPEC = remapped_spec(
    "robe", RobeOptions, RobeEmbeddingBagCollection,
    "ROBE-Z: random chunks of Z floats in one shared array (LMA without semantics)",
)
