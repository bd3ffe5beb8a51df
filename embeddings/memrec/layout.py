"""MEM-REC id maths: how a KJT of raw ids becomes weighted token lookups, and how results are finished.

A *layout* holds no parameters. It is shared by the single-process modules (``embeddings.memrec.module``,
``embeddings.memrec.per_sample``) and the sharded wrapper (``sharding.memrec``), which call its three
steps at the places TorchRec's pipeline needs them:

1. ``expand(features, token_salts, weight_salts)`` - data-parallel side, no autograd: hash every id into
   token rows and weight rows and build the KJT the inner EmbeddingBagCollection looks up (plus
   :class:`MemRecAux`, what step 3 needs). In a sharded module this runs in ``input_dist``, before the
   inner EBC's input dist, so row-wise bucketing routes on the hashed rows.
2. ``weigh(kjt, weight_table)`` - model-parallel side (``compute``): turn the weight-row indices carried
   in ``kjt.weights()`` into learned weights. The input all-to-all is not differentiable, so the
   gather must happen after it.
3. ``finish(kt, aux, weight_table)`` - data-parallel side, after the output dist (MEAN division,
   per-sample alpha).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.checks import check_layout_args, select_features
from embeddings.hashing import hash_salt, identity_to_range
from embeddings.id_hash import salted_hash
from embeddings.hot_rows import HotLookup, HotSet
from embeddings.memrec.options import MAX_WEIGHT_ROWS, MemRecOptions


@dataclass
class MemRecAux:
    """Tensors computed in ``expand`` and used in ``finish`` (kept in the sharding context)."""

    divisor: Optional[torch.Tensor] = None  # per-token MEAN: [B, F] original ids per bag (>= 1)
    sample_of_value: Optional[torch.Tensor] = None  # per-sample: sample index of each raw id [N]
    weight_rows: Optional[torch.Tensor] = None  # per-sample: weight rows of each raw id [N, kw]
    counts: Optional[torch.Tensor] = None  # per-sample: raw ids per sample [B]

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)


def with_weights(kjt: KeyedJaggedTensor, weights: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` with its weights replaced (structure, lengths and cached per-key metadata kept)."""
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        weights=weights,
        lengths=kjt.lengths_or_none(),
        offsets=kjt.offsets_or_none(),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key_or_none(),
        offset_per_key=kjt.offset_per_key_or_none(),
    )


def with_values(kt: KeyedTensor, values: torch.Tensor) -> KeyedTensor:
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values, key_dim=kt.key_dim())


def lengths_per_key(kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Number of values of each key, computed on device (no host sync); needs a uniform stride."""
    lengths = kjt.lengths()
    num_keys = len(kjt.keys())
    if lengths.numel() == 0:
        return torch.zeros(num_keys, dtype=torch.int64, device=lengths.device)
    return lengths.view(num_keys, -1).sum(1)


def init_weight_table(table: torch.Tensor, options: MemRecOptions) -> None:
    """Initialise a weight table in place according to ``options.weight_init``."""
    with torch.no_grad():
        if options.weight_init == "ones":
            table.fill_(1.0)
        else:
            bound = math.sqrt(1.0 / options.weight_rows)
            table.uniform_(-bound, bound)


class MemRecLayout(abc.ABC):
    """Common part of the two granularities: features, table names, hash salts, hashing."""

    def __init__(
        self, feature_names: Sequence[str], embedding_dim: int, options: MemRecOptions, table_prefix: str
    ) -> None:
        names = check_layout_args(feature_names, embedding_dim, table_prefix)
        if not isinstance(options, MemRecOptions):
            raise TypeError(f"options must be MemRecOptions, got {type(options).__name__}")
        self.feature_names: List[str] = names
        self.embedding_dim = embedding_dim
        self.options = options
        self.table_prefix = table_prefix
        self._feature_index: Dict[str, int] = {f: i for i, f in enumerate(names)}
        self._device_cache: Dict[Tuple[str, Tuple[str, ...]], torch.Tensor] = {}
        self.hot = HotLookup(HotSet.empty(names))

    def set_hot(self, hot: HotSet) -> None:
        """Give ``hot``'s values exact rows: after the D hashed rows of their token table, each with its own
        weight after the hashed weight rows (see :class:`PerTokenLayout`)."""
        if hot.total and not isinstance(self, PerTokenLayout):
            raise ValueError("MEM-REC hot rows need granularity 'per_token'")
        if list(hot.feature_names) != self.feature_names:
            raise ValueError(f"hot set features {list(hot.feature_names)} differ from the layout's {self.feature_names}")
        self.hot = HotLookup(hot)
        if self.weight_table_rows > MAX_WEIGHT_ROWS:
            raise ValueError(f"MEM-REC weight rows (hashed + one per hot value) {self.weight_table_rows} exceed 2**24 "
                             "(a weight row travels as a float32 KJT weight); lower hot_share or num_weight_rows")

    # ---- tables -------------------------------------------------------------------------------
    @property
    def weight_table_name(self) -> str:
        return f"{self.table_prefix}_weights"

    @property
    def num_weight_tables(self) -> int:
        return 1 if self.options.shared_tables else len(self.feature_names)

    @property
    def weight_table_rows(self) -> int:
        """Rows of the single weight parameter: the per-feature dw x 1 tables stacked, then one per hot value."""
        return self.num_weight_tables * self.options.weight_rows + self.hot.total

    def token_init_fn(self) -> partial:
        bound = math.sqrt(1.0 / self.options.token_rows)
        if self.options.token_init == "normal":
            return partial(torch.nn.init.normal_, mean=0.0, std=bound)
        return partial(torch.nn.init.uniform_, a=-bound, b=bound)

    def _token_config(self, name: str, features: List[str], hot_rows: int = 0) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(
            name=name,
            embedding_dim=self.embedding_dim,
            num_embeddings=self.options.token_rows + hot_rows,
            feature_names=features,
            pooling=PoolingType.SUM,  # MEAN is applied by ``finish`` with the original id counts
            init_fn=self.token_init_fn(),
        )

    @abc.abstractmethod
    def token_table_configs(self) -> List[EmbeddingBagConfig]:
        """Configs of the inner EmbeddingBagCollection's tables (always SUM-pooled)."""

    @property
    @abc.abstractmethod
    def is_weighted(self) -> bool:
        """Whether the inner token lookups are weighted."""

    @abc.abstractmethod
    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        """Lookups per sample of each table (per input feature), from raw ids per sample and feature."""

    # ---- hashing ------------------------------------------------------------------------------
    def salts(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """CPU int64 salts: token [F, K] with hash indices 2k, weight [F, kw] with 2j + 1."""
        features = torch.arange(len(self.feature_names), dtype=torch.int64)[:, None]
        token_k = 2 * torch.arange(self.options.num_token_hashes, dtype=torch.int64)[None, :]
        weight_k = 2 * torch.arange(self.options.num_weight_hashes, dtype=torch.int64)[None, :] + 1
        return hash_salt(features, self.options.seed, token_k), hash_salt(features, self.options.seed, weight_k)

    def hash_rows(
        self, values: torch.Tensor, feature_of_value: torch.Tensor, salts: torch.Tensor, num_rows: int, token: bool
    ) -> torch.Tensor:
        """[N, H] rows of each raw id (H = K for token rows, kw for weight rows)."""
        if self.options.hash == "identity":
            rows = identity_to_range(values, num_rows) if token else torch.zeros_like(values)
            return rows[:, None]
        return salted_hash(values, feature_of_value, salts, num_buckets=num_rows, backend=self.options.hash_backend)

    def select_features(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` restricted to and ordered as this module's features (checks shape only)."""
        return select_features(features, self.feature_names, "MEM-REC",
                               " (its KJT weights carry weight rows)")

    def _cached(self, tag: str, keys: List[str], device: torch.device, values: List[int]) -> torch.Tensor:
        key = (f"{tag}@{device}", tuple(keys))
        tensor = self._device_cache.get(key)
        if tensor is None:
            tensor = torch.tensor(values, dtype=torch.int64, device=device)
            self._device_cache[key] = tensor
        return tensor

    def weight_row_offsets(self, keys: List[str], device: torch.device) -> torch.Tensor:
        """Start row, in the stacked weight parameter, of each key's dw x 1 table."""
        dw = self.options.weight_rows
        return self._cached("weight_offsets", keys, device, [self._feature_index[k] * dw for k in keys])

    # ---- the three steps ----------------------------------------------------------------------
    @abc.abstractmethod
    def expand(
        self, features: KeyedJaggedTensor, token_salts: torch.Tensor, weight_salts: torch.Tensor,
        hot_buffers: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Tuple[KeyedJaggedTensor, MemRecAux]:
        """Raw-id KJT -> inner-EBC KJT and aux (call under ``torch.no_grad()``); ``hot_buffers``: the
        hot-row lookup's buffers (``self.hot.buffers``), needed when there are hot rows."""

    @abc.abstractmethod
    def weigh(self, kjt: KeyedJaggedTensor, weight_table: torch.Tensor) -> KeyedJaggedTensor:
        """Model-parallel side: weight-row indices -> learned weights."""

    @abc.abstractmethod
    def finish(self, kt: KeyedTensor, aux: MemRecAux, weight_table: torch.Tensor) -> KeyedTensor:
        """Data-parallel side after the lookups: the module's output."""


class PerTokenLayout(MemRecLayout):
    """One pooled vector per (sample, feature): z(f, x) = sum_k sum_j w[g_j(f, x)] * M[h_k(f, x)].

    Each raw id becomes K * kw (token row, weight row) pairs; the weight row rides in the KJT weights
    as float32 and is gathered into a learned weight by :meth:`weigh`.

    Hot value ``i`` of feature ``f`` (``embeddings.hot_rows``) becomes one pair instead: token row
    ``D + s_f + i`` (``s_f`` = hot values of earlier features with one shared table, else 0) and weight row
    ``T * dw + start_f + i`` (after the T stacked hashed weight tables), so ``z = w_hot * M_hot``.
    """

    def token_table_name(self, feature: str) -> str:
        if self.options.shared_tables:
            return f"{self.table_prefix}_tokens"
        return f"{self.table_prefix}_tokens_{feature}"

    def token_table_configs(self) -> List[EmbeddingBagConfig]:
        if self.options.shared_tables:
            return [self._token_config(self.token_table_name(""), list(self.feature_names), self.hot.total)]
        return [self._token_config(self.token_table_name(f), [f], hot)
                for f, hot in zip(self.feature_names, self.hot.sizes)]

    @property
    def is_weighted(self) -> bool:
        return True

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        per_id = float(self.options.lookups_per_id)
        out: Dict[str, List[float]] = {}
        for feature, pf in zip(self.feature_names, pooling_factors):
            out.setdefault(self.token_table_name(feature), []).append(per_id * float(pf))
        out[self.weight_table_name] = [per_id * float(sum(pooling_factors))]
        return out

    def expand(
        self, features: KeyedJaggedTensor, token_salts: torch.Tensor, weight_salts: torch.Tensor,
        hot_buffers: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Tuple[KeyedJaggedTensor, MemRecAux]:
        features = self.select_features(features)
        opts = self.options
        num_features, batch = len(self.feature_names), features.stride()
        values = features.values().to(torch.int64)
        lengths = features.lengths()
        n = values.numel()
        counts = lengths.view(num_features, batch)  # raw ids per (feature, sample)
        features_arange = torch.arange(num_features, dtype=torch.int64, device=values.device)
        feature_of_value = torch.repeat_interleave(features_arange, counts.sum(1).to(torch.int64), output_size=n)
        token_rows = self.hash_rows(values, feature_of_value, token_salts, opts.token_rows, token=True)
        weight_rows = self.hash_rows(values, feature_of_value, weight_salts, opts.weight_rows, token=False)
        k, kw = token_rows.shape[1], weight_rows.shape[1]
        tokens = token_rows[:, :, None].expand(n, k, kw).reshape(n, k * kw)
        weights = weight_rows[:, None, :].expand(n, k, kw).reshape(n, k * kw)
        if self.hot.total:
            if hot_buffers is None:
                raise ValueError("MEM-REC with hot rows: expand needs the hot-row buffers")
            tokens, weights, lengths = self._hot_pairs(values, feature_of_value, lengths, tokens, weights, hot_buffers)
        kjt = KeyedJaggedTensor(
            keys=list(self.feature_names),
            values=tokens.reshape(-1),
            weights=weights.reshape(-1).to(torch.float32),
            lengths=lengths if self.hot.total else lengths * (k * kw),
            stride=batch,
        )
        divisor = None
        if opts.pooling == "mean":
            divisor = counts.t().clamp(min=1).to(torch.float32)
        return kjt, MemRecAux(divisor=divisor)

    def _hot_pairs(self, values: torch.Tensor, feature_of_value: torch.Tensor, lengths: torch.Tensor,
                   tokens: torch.Tensor, weights: torch.Tensor, buffers: Mapping[str, torch.Tensor],
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hot ids' one pair (see the class doc) in place of their K * kw pairs; the bags' new lengths."""
        hit, index = self.hot.lookup(values, feature_of_value, buffers)
        starts = buffers["hot_starts"][feature_of_value]
        global_index = starts + index
        token = self.options.token_rows + (global_index if self.options.shared_tables else index)
        # weigh() adds each key's weight-table offset (feature * dw) unless tables are shared
        offset = 0 if self.options.shared_tables else feature_of_value * self.options.weight_rows
        weight = self.num_weight_tables * self.options.weight_rows + global_index - offset
        tokens = torch.cat([torch.where(hit, token, tokens[:, 0])[:, None], tokens[:, 1:]], dim=1)
        weights = torch.cat([torch.where(hit, weight, weights[:, 0])[:, None], weights[:, 1:]], dim=1)
        per_id = tokens.shape[1]
        if per_id == 1:
            return tokens, weights, lengths
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[:, 1:] = ~hit[:, None]
        pairs = torch.where(hit, 1, per_id)
        bags = torch.arange(lengths.numel(), dtype=torch.int64, device=lengths.device)
        bag_of_value = torch.repeat_interleave(bags, lengths.to(torch.int64), output_size=values.numel())
        new_lengths = torch.zeros(lengths.numel(), dtype=torch.int64, device=lengths.device)
        new_lengths.index_add_(0, bag_of_value, pairs)
        return tokens[keep], weights[keep], new_lengths.to(lengths.dtype)

    def weigh(self, kjt: KeyedJaggedTensor, weight_table: torch.Tensor) -> KeyedJaggedTensor:
        rows = kjt.weights().to(torch.int64)
        if not self.options.shared_tables:
            offsets = self.weight_row_offsets(kjt.keys(), rows.device)
            rows = rows + torch.repeat_interleave(offsets, lengths_per_key(kjt), output_size=rows.numel())
        return with_weights(kjt, weight_table.view(-1).index_select(0, rows))

    def finish(self, kt: KeyedTensor, aux: MemRecAux, weight_table: torch.Tensor) -> KeyedTensor:
        if aux.divisor is None:
            return kt
        divisor = aux.divisor  # columns in feature order; a sharded EBC orders its keys by sharding
        if kt.keys() != self.feature_names:
            order = self._cached("key_order", kt.keys(), divisor.device, [self._feature_index[k] for k in kt.keys()])
            divisor = divisor.index_select(1, order)
        return with_values(kt, kt.values() / divisor.repeat_interleave(self.embedding_dim, dim=1))
