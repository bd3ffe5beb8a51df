"""``qr``: the quotient-remainder trick (Shi et al., KDD 2020), element-wise product, per id.

Raw id ``x`` of feature ``f`` is first mapped into the feature's full table, ``y = hash_to_range(x, f, seed,
0, n_f)`` (``hash: identity``: ``y = x mod n_f``, the MLPerf v1 capping), then
``e(f, x) = W_q[f][y div c] * W_r[f][y mod c]`` (element-wise), with ``c = num_collisions``: a quotient
table of ``ceil(n_f / c)`` rows and a remainder table of ``c`` rows per feature (facebookresearch/dlrm's
``QREmbeddingBag`` sizes). A bag pools ``e`` over its ids (SUM or MEAN): the product is taken per id
*before* pooling, which is the method's definition for multi-hot bags (the DLRM reference multiplies the
pooled bags instead; identical only for one-hot).

A pooled EBC lookup cannot take a product per id, so every id is looked up as a bag of its own: the
inner KJT has two keys, ``qr_quotient_ids`` and ``qr_remainder_ids``, with stride ``N`` (the number of raw
ids in the batch) and every length 1; all features' quotient tables are stacked in one table
``qr_quotient`` (row offset per feature) and all remainder tables in ``qr_remainder``. ``finish`` multiplies
the two ``[N, dim]`` outputs and pools them into bags with ``index_add``. Cost against a pooled lookup: the
TBE output and the output all-to-all / reduce-scatter carry ``2 * N`` rows instead of ``F * B`` (equal for
one-hot data, ``2 * pooling factor`` times more for multi-hot), plus one ``[N, dim]`` product and scatter.
Ranks may hold different ``N``; the sharded module pads every rank's inner KJT with empty bags to the
largest ``N`` (one scalar all-reduce per batch and a host sync), since the row-wise output dist's backward
with unequal batches per rank is an uneven all-gather that gloo does not implement.

``remainder_init``: "ones" (default) starts ``e`` as the quotient row, i.e. as the hashing trick into
``n_f / c`` rows, at a full table's scale; "uniform" gives both tables U(+-sqrt(1/rows)).

With ``budget`` (``embeddings.budget``), ``c`` is the smallest collision count whose tables fit the bytes left after
the hot rows and buffers (QR's size has a floor, ``~2 * dim * sqrt(F * sum(n_f))`` floats, below which no ``c``
fits). Hot value ``i`` of feature ``f`` (``embeddings.hot_rows``) gets quotient row ``Q + start_f + i`` after the
``Q`` stacked quotient rows and the one remainder row ``F * c`` shared by all hot values: ``e = W_q[hot] * r``,
an exact row up to one learned per-element scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.budget import FLOAT_BYTES, BudgetOptions, budget_bytes, remaining, select_hot
from embeddings.remap import (
    POOLINGS,
    Aux,
    RemapLayout,
    RemappedEmbeddingBagCollection,
    check_choice,
    check_int,
    feature_of_values,
    pooling_type,
    remapped_spec,
    uniform_init,
    wrap_of,
)
from embeddings.hashing import HASH_BACKENDS, hash_salt
from embeddings.id_hash import salted_hash
from embeddings.hot_rows import HotLookup, hot_bytes
from embeddings.types import SparseArchContext


@dataclass
class QrOptions(BudgetOptions):
    """QR-trick options.

    - ``num_collisions`` (c): rows of each remainder table; each quotient row is shared by c ids.
    - ``pooling``: "sum" or "mean" over the ids of a multi-hot bag.
    - ``seed``: seed of the hash into the full table, in [0, 2**63).
    - ``hash``: "mix" (pinned hash into [0, n_f)) or "identity" (``id mod n_f``).
    - ``remainder_init``: "ones" or "uniform" (see the module docstring).
    - ``hash_backend``: "torch" (int64 tensor ops, any device) or "fused" (one-pass C kernel compiled at
      first use, CPU tensors only; same bits; falls back to "torch", logged, where it cannot run).
    - ``budget``, ``hot_share``, ``hot_min_count``: see ``embeddings.budget.BudgetOptions``; with ``budget``,
      ``num_collisions`` is derived (leave it at its default).
    """

    num_collisions: int = 4
    pooling: str = "sum"
    seed: int = 0
    hash: str = "mix"
    remainder_init: str = "ones"
    hash_backend: str = "torch"

    def __post_init__(self) -> None:
        check_int("num_collisions", self.num_collisions, 1)
        check_choice("pooling", self.pooling, POOLINGS)
        check_int("seed", self.seed, 0, (1 << 63) - 1)
        check_choice("hash", self.hash, ("mix", "identity"))
        check_choice("remainder_init", self.remainder_init, ("ones", "uniform"))
        check_choice("hash_backend", self.hash_backend, HASH_BACKENDS)
        self.check_budget()
        if self.hash == "identity" and self.hot_share > 0:
            raise ValueError("embeddings.options.hash 'identity' is the plain QR trick: it takes no hot rows")

    @property
    def needs_table_sizes(self) -> bool:
        return True  # ids are mapped into each feature's full table before the split


class QrLayout(RemapLayout):
    """Stacked quotient and remainder tables, looked up per id (see the module docstring)."""

    method = "qr"

    def __init__(self, ctx: SparseArchContext, options: QrOptions, table_prefix: str = "qr") -> None:
        super().__init__(ctx.feature_names, ctx.embedding_dim, table_prefix)
        self.full_rows = ctx.table_sizes("qr (ids are hashed into each feature's full table, then split)")
        if options.budget is not None:
            options = dataclasses.replace(options, num_collisions=self._budget_collisions(ctx, options))
        self.options = options
        c = options.num_collisions
        self.quotient_rows = [math.ceil(n / c) for n in self.full_rows]
        self.quotient_offsets = [sum(self.quotient_rows[:i]) for i in range(len(self.full_rows))]
        self.quotient_key = f"{table_prefix}_quotient_ids"
        self.remainder_key = f"{table_prefix}_remainder_ids"

    def _budget_collisions(self, ctx: SparseArchContext, options: QrOptions) -> int:
        """The smallest c whose tables fit the budget left after hot rows and buffers (sets the hot set)."""
        assert options.budget is not None
        row_bytes = self.embedding_dim * FLOAT_BYTES
        hot = select_hot(ctx, options, row_bytes)
        self.hot = HotLookup(hot)
        count = len(self.feature_names)
        fixed = 5 * 8 * count + hot_bytes(hot) + hot.total * row_bytes + (row_bytes if hot.total else 0)
        rows = remaining(budget_bytes(ctx, options.budget), fixed, "the hot rows and buffers") // row_bytes

        def needed(c: int) -> int:
            return sum(math.ceil(n / c) for n in self.full_rows) + count * c

        best = max(1, int(math.sqrt(sum(self.full_rows) / count)))  # about where needed(c) is smallest
        best = min(range(max(1, best // 2), 2 * best + 2), key=needed)
        if needed(best) > rows:
            raise ValueError(f"embeddings.options.budget leaves {rows:,} rows for QR, whose tables need at least "
                             f"{needed(best):,} (c = {best}); raise the budget or lower hot_share")
        low, high = 1, best  # needed() decreases on [1, best]: the smallest c that fits
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if needed(mid) > rows else (low, mid)
        return low

    @property
    def quotient_table(self) -> str:
        return f"{self.table_prefix}_quotient"

    @property
    def remainder_table(self) -> str:
        return f"{self.table_prefix}_remainder"

    def inner_configs(self) -> List[EmbeddingBagConfig]:
        q_rows = sum(self.quotient_rows) + self.hot.total
        r_rows = len(self.feature_names) * self.options.num_collisions + (1 if self.hot.total else 0)
        r_init = uniform_init(r_rows) if self.options.remainder_init == "uniform" else torch.nn.init.ones_
        return [
            EmbeddingBagConfig(name=self.quotient_table, embedding_dim=self.embedding_dim, num_embeddings=q_rows,
                               feature_names=[self.quotient_key], pooling=PoolingType.SUM, init_fn=uniform_init(q_rows)),
            EmbeddingBagConfig(name=self.remainder_table, embedding_dim=self.embedding_dim, num_embeddings=r_rows,
                               feature_names=[self.remainder_key], pooling=PoolingType.SUM, init_fn=r_init),
        ]

    def logical_configs(self) -> List[EmbeddingBagConfig]:
        rows = sum(c.num_embeddings for c in self.inner_configs())
        return [EmbeddingBagConfig(name=self.table_prefix, embedding_dim=self.embedding_dim, num_embeddings=rows,
                                   feature_names=list(self.feature_names), pooling=pooling_type(self.options.pooling))]

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        per_sample = float(sum(pooling_factors))  # one single-id bag per raw id of the sample
        return {self.quotient_table: [per_sample], self.remainder_table: [per_sample]}

    def buffers(self, device: torch.device) -> Dict[str, torch.Tensor]:
        features = torch.arange(len(self.feature_names), dtype=torch.int64)
        c = self.options.num_collisions
        return {"qr_salts": hash_salt(features, self.options.seed, 0).to(device),
                "qr_full_rows": torch.tensor(self.full_rows, dtype=torch.int64, device=device),
                "qr_wrap": torch.tensor(wrap_of(self.full_rows), dtype=torch.int64, device=device),
                "qr_quotient_offsets": torch.tensor(self.quotient_offsets, dtype=torch.int64, device=device),
                "qr_remainder_offsets": (features * c).to(device)}

    def expand(self, features: KeyedJaggedTensor, buffers: Mapping[str, torch.Tensor],
               stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, Aux]:
        features = self.select_features(features)
        values = features.values().to(torch.int64)
        lengths = features.lengths()
        n = values.numel()
        feature_of_value, _ = feature_of_values(lengths, len(self.feature_names), n)
        if self.options.hash == "identity":
            y = torch.remainder(values, buffers["qr_full_rows"][feature_of_value])
        else:
            y = salted_hash(values, feature_of_value, buffers["qr_salts"], rows=buffers["qr_full_rows"],
                            wrap=buffers["qr_wrap"], backend=self.options.hash_backend)
        c = self.options.num_collisions
        quotient = torch.div(y, c, rounding_mode="floor") + buffers["qr_quotient_offsets"][feature_of_value]
        remainder = torch.remainder(y, c) + buffers["qr_remainder_offsets"][feature_of_value]
        if self.hot.total:  # hot value i of feature f: quotient row Q + start_f + i, the shared remainder row F * c
            hit, index = self.hot.lookup(values, feature_of_value, buffers)
            first_hot = sum(self.quotient_rows)
            quotient = torch.where(hit, first_hot + buffers["hot_starts"][feature_of_value] + index, quotient)
            remainder = torch.where(hit, len(self.feature_names) * c, remainder)
        # every id a bag of its own; padded with empty bags up to ``stride`` (at least 1: KJTs need one)
        stride = max(1, n, stride or 0)
        one_key = torch.zeros(stride, dtype=lengths.dtype, device=lengths.device)
        one_key[:n] = 1
        kjt = KeyedJaggedTensor(keys=[self.quotient_key, self.remainder_key], values=torch.cat([quotient, remainder]),
                                lengths=torch.cat([one_key, one_key]), stride=stride)
        bags = torch.arange(lengths.numel(), dtype=torch.int64, device=lengths.device)
        aux = {"bag_of_id": torch.repeat_interleave(bags, lengths.to(torch.int64), output_size=n),
               "bag_sizes": lengths.to(torch.float32)}
        return kjt, aux

    def local_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        return max(1, self.select_features(features).values().numel())

    def finish(self, kt: KeyedTensor, aux: Aux) -> KeyedTensor:
        assert aux is not None, "expand must run before finish"
        # [N, dim]: the product per id, before pooling (the slice drops the padding bags)
        per_id = (kt[self.quotient_key] * kt[self.remainder_key])[: aux["bag_of_id"].numel()]
        bag_sizes = aux["bag_sizes"]
        pooled = torch.zeros(bag_sizes.numel(), self.embedding_dim, dtype=per_id.dtype, device=per_id.device)
        pooled = pooled.index_add(0, aux["bag_of_id"], per_id)
        if self.options.pooling == "mean":
            pooled = pooled / bag_sizes.clamp(min=1.0)[:, None]
        num_features = len(self.feature_names)
        values = pooled.view(num_features, -1, self.embedding_dim).transpose(0, 1).reshape(-1, num_features * self.embedding_dim)
        return KeyedTensor(keys=self.feature_names, length_per_key=[self.embedding_dim] * num_features, values=values)


class QREmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """QR trick; drop-in for an EmbeddingBagCollection (KJT of raw int64 ids in)."""

    layout: QrLayout

    def __init__(self, ctx: SparseArchContext, options: QrOptions, table_prefix: str = "qr") -> None:
        super().__init__(QrLayout(ctx, options, table_prefix), ctx.device,
                         ctx.all_pooling_factors())


SPEC = remapped_spec(
    "qr", QrOptions, QREmbeddingBagCollection,
    "quotient-remainder trick: W_q[y div c] * W_r[y mod c] per id (Shi et al. 2020)",
)
