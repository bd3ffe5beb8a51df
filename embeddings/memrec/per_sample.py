"""MEM-REC at per-sample granularity, as Intel's released code does it, and its DLRM-style head.

All ids of all features of a sample share one bag: its F' * K token rows (F' = raw ids of the sample)
are summed into one m-dim vector and scaled by one scalar alpha, the sum of the sample's F' * kw
weights::

    z(sample) = (sum_{f, x, j} w[g_j(f, x)]) * (sum_{f, x, k} M[h_k(f, x)])

The product of the two sums is not a weighted bag, so the token bag is looked up unweighted and alpha
is applied after the lookups (``finish``). alpha is a sum over the replicated weight table, computed
on the data-parallel side where every rank has that table: no weight index needs to travel.

The head (``MemRecPerSampleDLRM``) concatenates the bottom-MLP output with z; no dot interaction;
top-MLP input = bottom output + m.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.memrec.layout import MemRecAux, MemRecLayout, with_values
from embeddings.memrec.module import MemRecModuleBase
from embeddings.memrec.options import MemRecOptions


def sample_major_order(lengths: torch.Tensor, num_features: int, batch: int, num_values: int) -> torch.Tensor:
    """What ``argsort(sample_of_value, stable=True)`` gives for a feature-major KJT (the values grouped by
    sample, features and positions in order within a sample), in O(n) from the lengths, without a sort."""
    counts = lengths.view(num_features, batch).to(torch.int64)
    flat = counts.reshape(-1)  # bag sizes, feature-major
    by_sample = counts.t().reshape(-1)  # the same bags, sample-major: the order they take in the output
    target_start = (torch.cumsum(by_sample, 0) - by_sample).view(batch, num_features).t().reshape(-1)
    shift = target_start - (torch.cumsum(flat, 0) - flat)  # target start - source start, per bag
    positions = torch.arange(num_values, dtype=torch.int64, device=lengths.device)
    target = positions + torch.repeat_interleave(shift, flat, output_size=num_values)
    return torch.empty_like(positions).scatter_(0, target, positions)


class PerSampleLayout(MemRecLayout):
    """One bag per sample over all features; output key ``<prefix>_sample``."""

    @property
    def sample_key(self) -> str:
        return f"{self.table_prefix}_sample"

    @property
    def token_table_name(self) -> str:
        return f"{self.table_prefix}_tokens"

    def token_table_configs(self) -> List[EmbeddingBagConfig]:
        return [self._token_config(self.token_table_name, [self.sample_key])]

    @property
    def is_weighted(self) -> bool:
        return False

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        ids_per_sample = float(sum(pooling_factors))
        return {
            self.token_table_name: [self.options.num_token_hashes * ids_per_sample],
            self.weight_table_name: [self.options.num_weight_hashes * ids_per_sample],
        }

    def expand(
        self, features: KeyedJaggedTensor, token_salts: torch.Tensor, weight_salts: torch.Tensor,
        hot_buffers: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Tuple[KeyedJaggedTensor, MemRecAux]:
        features = self.select_features(features)
        num_features, batch = len(self.feature_names), features.stride()
        values = features.values().to(torch.int64)
        lengths = features.lengths().to(torch.int64)
        n = values.numel()
        bag = torch.arange(num_features * batch, dtype=torch.int64, device=values.device)
        bag_of_value = torch.repeat_interleave(bag, lengths, output_size=n)  # bag = feature * B + sample
        feature_of_value = torch.div(bag_of_value, batch, rounding_mode="floor")
        sample_of_value = bag_of_value - feature_of_value * batch
        token_rows = self.hash_rows(values, feature_of_value, token_salts, self.options.token_rows, token=True)
        weight_rows = self.hash_rows(values, feature_of_value, weight_salts, self.options.weight_rows, token=False)
        order = sample_major_order(lengths, num_features, batch, n)  # group the ids of each sample together
        counts = lengths.view(num_features, batch).sum(0)  # raw ids per sample
        kjt = KeyedJaggedTensor(
            keys=[self.sample_key],
            values=token_rows[order].reshape(-1),
            lengths=counts * token_rows.shape[1],
            stride=batch,
        )
        return kjt, MemRecAux(sample_of_value=sample_of_value, weight_rows=weight_rows, counts=counts)

    def weigh(self, kjt: KeyedJaggedTensor, weight_table: torch.Tensor) -> KeyedJaggedTensor:
        return kjt  # unweighted bag; alpha is applied in ``finish``

    def finish(self, kt: KeyedTensor, aux: MemRecAux, weight_table: torch.Tensor) -> KeyedTensor:
        assert aux.sample_of_value is not None and aux.weight_rows is not None and aux.counts is not None
        per_id = weight_table.view(-1).index_select(0, aux.weight_rows.reshape(-1))
        per_id = per_id.view(aux.weight_rows.shape).sum(1)
        alpha = torch.zeros(aux.counts.numel(), dtype=per_id.dtype, device=per_id.device)
        alpha = alpha.index_add(0, aux.sample_of_value, per_id)
        if self.options.pooling == "mean":
            alpha = alpha / aux.counts.clamp(min=1).to(alpha.dtype)
        return with_values(kt, kt.values() * alpha[:, None])


class MemRecPerSampleEmbeddingBag(MemRecModuleBase):
    """MEM-REC, per-sample granularity: KJT of raw ids in, KeyedTensor with one key
    (``<prefix>_sample``, dim m) out. ``options`` must have ``granularity="per_sample"`` (which
    implies ``shared_tables``); ``pooling="mean"`` divides by the sample's number of raw ids.
    Other arguments as :class:`embeddings.memrec.module.MemRecEmbeddingBagCollection`.
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        embedding_dim: int,
        options: MemRecOptions,
        device: Optional[torch.device] = None,
        pooling_factors: Optional[Sequence[float]] = None,
        table_prefix: str = "memrec",
    ) -> None:
        if options.granularity != "per_sample":
            raise ValueError(
                f"MemRecPerSampleEmbeddingBag needs embeddings.options.granularity 'per_sample', got "
                f"{options.granularity!r} (use MemRecEmbeddingBagCollection)"
            )
        super().__init__(PerSampleLayout(feature_names, embedding_dim, options, table_prefix), device, pooling_factors)


class MemRecPerSampleDLRM(nn.Module):
    """DLRM head of the released MEM-REC code: logits = top_mlp([bottom_mlp(dense), z(sample)]).

    Args:
        embedding_bag_collection: a :class:`MemRecPerSampleEmbeddingBag` (or its sharded form).
        dense_in_features: number of dense features.
        dense_arch_layer_sizes: bottom MLP sizes (ReLU after each layer, as in torchrec's DLRM).
        over_arch_layer_sizes: top MLP sizes, the last one 1 (the logit).
        dense_device: device of the MLPs.

    Submodule paths mirror ``torchrec.models.dlrm.DLRM`` (``sparse_arch.embedding_bag_collection``).
    """

    def __init__(
        self,
        embedding_bag_collection: MemRecPerSampleEmbeddingBag,
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        over_arch_layer_sizes: List[int],
        dense_device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        if len(configs) != 1 or len(configs[0].feature_names) != 1:
            raise ValueError("MemRecPerSampleDLRM needs a per-sample module (one table, one output key)")
        if not dense_arch_layer_sizes or not over_arch_layer_sizes or over_arch_layer_sizes[-1] != 1:
            raise ValueError(
                f"need non-empty MLPs ending in one logit, got bottom {dense_arch_layer_sizes} "
                f"and top {over_arch_layer_sizes}"
            )
        self.embedding_dim = configs[0].embedding_dim
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, dense_device)
        self.sparse_arch = SparseArch(embedding_bag_collection)
        self.over_arch = OverArch(
            in_features=dense_arch_layer_sizes[-1] + self.embedding_dim,
            layer_sizes=over_arch_layer_sizes,
            device=dense_device,
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """[B, 13]-style dense features and a KJT of raw ids -> logits [B, 1]."""
        dense = self.dense_arch(dense_features)
        sample = self.sparse_arch(sparse_features).reshape(-1, self.embedding_dim)  # [B, 1, m] -> [B, m]
        return self.over_arch(torch.cat([dense, sample], dim=1))
