"""Single-process MEM-REC modules: an inner TorchRec EmbeddingBagCollection for the token tables plus a
small weight-table parameter, composed (not forked) so that ``sharding.memrec`` can shard the inner EBC
with TorchRec's own sharder (fbgemm TBE lookups, fused optimizers).

``MemRecEmbeddingBagCollection`` is the per-token granularity: KJT of raw int64 ids in, KeyedTensor out
with one m-dim vector per (sample, feature), so it drops into ``torchrec.models.dlrm.DLRM`` /
``DLRM_DCN`` in place of an EmbeddingBagCollection.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.quant import InferenceForm, register_form
from embeddings.hot_rows import HotSet
from embeddings.memrec.layout import MemRecLayout, PerTokenLayout, init_weight_table
from embeddings.memrec.options import MemRecOptions


class MemRecModuleBase(EmbeddingBagCollectionInterface):
    """Parameters and forward shared by both granularities; the id maths is in ``self.layout``.

    State (identical names in the sharded module, so state dicts interchange):
    - ``token_ebc``: EmbeddingBagCollection of the D x m token tables (SUM-pooled).
    - ``weight_table``: [T * dw, 1] parameter, the T (1 if shared, else one per feature) dw x 1 weight
      tables stacked; replicated (data parallel) when sharded.
    - ``token_salts`` [F, K], ``weight_salts`` [F, kw]: non-persistent int64 buffers derived from the seed.
    - with hot rows, the hot-row lookup's non-persistent buffers (``hot_keys``, ``hot_starts``, ...).

    ``pooling_factors`` (raw ids per sample and feature, default 1) are only hints for the planner.
    """

    def __init__(
        self,
        layout: MemRecLayout,
        device: Optional[torch.device] = None,
        pooling_factors: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.layout = layout
        num_features = len(layout.feature_names)
        if pooling_factors is None:
            pooling_factors = [1.0] * num_features
        if len(pooling_factors) != num_features:
            raise ValueError(f"pooling_factors has {len(pooling_factors)} entries for {num_features} features")
        self.pooling_factors: List[float] = [float(p) for p in pooling_factors]
        self.token_ebc = EmbeddingBagCollection(
            tables=layout.token_table_configs(), is_weighted=layout.is_weighted, device=device
        )
        self.weight_table = nn.Parameter(torch.empty(layout.weight_table_rows, 1, device=device))
        token_salts, weight_salts = layout.salts()
        self.register_buffer("token_salts", token_salts.to(device), persistent=False)
        self.register_buffer("weight_salts", weight_salts.to(device), persistent=False)
        self._hot_names: List[str] = []
        for name, tensor in layout.hot.buffers(device).items():
            self.register_buffer(name, tensor, persistent=False)
            self._hot_names.append(name)
        self.reset_parameters()

    def hot_buffers(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._hot_names}

    @property
    def options(self) -> MemRecOptions:
        return self.layout.options

    def reset_parameters(self) -> None:
        """Re-initialise the weight table (the token tables reset through ``token_ebc``)."""
        if not self.weight_table.is_meta:
            init_weight_table(self.weight_table, self.options)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        with torch.no_grad():
            kjt, aux = self.layout.expand(features, self.token_salts, self.weight_salts, self.hot_buffers())
        kjt = self.layout.weigh(kjt, self.weight_table)
        return self.layout.finish(self.token_ebc(kjt), aux, self.weight_table)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The token tables (always SUM-pooled inside; ``options.pooling`` is applied on the output)."""
        return self.token_ebc.embedding_bag_configs()

    def is_weighted(self) -> bool:
        """Whether the token lookups are weighted (read by the planner). Inputs are always unweighted."""
        return self.layout.is_weighted


class MemRecEmbeddingBagCollection(MemRecModuleBase):
    """MEM-REC, per-token granularity: one vector per (sample, feature), pooled SUM or MEAN over its ids.

    Args:
        feature_names: sparse features, in output order.
        embedding_dim: m, the token-row (output) dimension.
        options: :class:`MemRecOptions` with ``granularity="per_token"``.
        device: where parameters live (``meta`` for planning).
        pooling_factors: mean raw ids per sample for each feature (planner hints).
        table_prefix: prefix of the table names, which must be unique within a model.
        hot: values with exact rows of their own (``embeddings.hot_rows``); None = none.
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        embedding_dim: int,
        options: MemRecOptions,
        device: Optional[torch.device] = None,
        pooling_factors: Optional[Sequence[float]] = None,
        table_prefix: str = "memrec",
        hot: Optional[HotSet] = None,
    ) -> None:
        if options.granularity != "per_token":
            raise ValueError(
                f"MemRecEmbeddingBagCollection needs embeddings.options.granularity 'per_token', got "
                f"{options.granularity!r} (use MemRecPerSampleEmbeddingBag)"
            )
        layout = PerTokenLayout(feature_names, embedding_dim, options, table_prefix)
        if hot is not None:
            layout.set_hot(hot)
        super().__init__(layout, device, pooling_factors)


register_form("memrec", InferenceForm(MemRecModuleBase, "token_ebc", lambda layout: MemRecModuleBase(layout, device=torch.device("meta"))))
