"""``hash``: the hashing trick - each feature's raw ids hashed into a smaller table of its own.

Row of raw id ``x`` of feature ``f`` (index in the feature list): ``hash_to_range(x, f, seed, 0, rows_f)``
(``embeddings.hashing``: all 64 bits of the id count). ``rows_f`` is ``memory_fraction`` of the feature's
full table (at least 1 row), or ``num_rows`` for every feature. ``hash: identity`` takes ``x mod rows_f``
instead (MLPerf v1's id capping; with ``rows_f`` >= the id range the module is exactly an
EmbeddingBagCollection). Lookups are one pooled TBE lookup per id, as in a full table.

With ``budget`` (``embeddings.budget``) the tables are sized from bytes: ``hot_share`` of the budget buys hot rows
(``embeddings.hot_rows``), appended to their feature's table after its ``rows_f`` hashed rows (hot value ``i`` of
feature ``f`` is row ``rows_f + i``); the rest of the budget, less the buffers, is split into hashed rows in
proportion to each feature's full rows not covered by hot rows (at least 1 each). With every training value hot
and ``rows_f = 1``, this is the full table with a vocabulary (``full`` with ``ids: vocabulary``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.budget import BudgetOptions, PrecisionOptions, budget_bytes, remaining, select_hot, split_rows
from embeddings.remap import (
    KERNELS,
    DEFAULT_MEMORY_FRACTION,
    POOLINGS,
    Aux,
    RemapLayout,
    RemappedEmbeddingBagCollection,
    check_choice,
    check_int,
    check_memory,
    feature_of_values,
    pooling_type,
    remapped_spec,
    sized_rows,
    uniform_init,
    where,
    wrap_of,
)
from embeddings.hashing import HASH_BACKENDS, hash_salt
from embeddings.id_hash import salted_hash
from embeddings.ops.chunk_bag import BagArgs
from embeddings.hot_rows import HotLookup, hot_bytes
from embeddings.types import SparseArchContext


@dataclass
class HashOptions(BudgetOptions, PrecisionOptions):
    """Hashing-trick options.

    - ``memory_fraction``: rows of each table / rows of the feature's full table (default 1/16 when
      ``num_rows`` is null too; at least 1 row).
    - ``num_rows``: explicit rows of every feature's table.
    - ``pooling``: "sum" or "mean" over the ids of a multi-hot bag.
    - ``seed``: hash seed in [0, 2**63).
    - ``hash``: "mix" (pinned splitmix64 hash) or "identity" (``id mod rows``).
    - ``hash_backend``: "torch" (int64 tensor ops, any device) or "fused" (one-pass C kernel compiled at
      first use, CPU tensors only; same bits; falls back to "torch", logged, where it cannot run).
    - ``kernel``: "auto" (the unsharded module runs its whole embedding stage - hot rows, hashes, addresses,
      gather, pooling, and in training the backward with the fused optimizer - in one fused operator,
      ``embeddings.ops.chunk_bag``, where its C++ kernel runs: CPU tensors; the inner EmbeddingBagCollection
      elsewhere) or "tbe" (always the inner EmbeddingBagCollection); results are equal (tests/embeddings/test_chunk_bag.py).
    - ``budget``, ``hot_share``, ``hot_min_count``: see ``embeddings.budget.BudgetOptions`` (``budget``
      replaces ``memory_fraction`` / ``num_rows``).
    - ``precision``: "fp32" or "fp16" storage of the tables, hot rows included (they are rows of the same tables):
      see ``embeddings.budget.PrecisionOptions``.
    """

    memory_fraction: Optional[float] = None
    num_rows: Optional[int] = None
    pooling: str = "sum"
    seed: int = 0
    hash: str = "mix"
    hash_backend: str = "torch"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_memory(self.memory_fraction, self.num_rows)
        check_choice("pooling", self.pooling, POOLINGS)
        check_int("seed", self.seed, 0, (1 << 63) - 1)
        check_choice("hash", self.hash, ("mix", "identity"))
        check_choice("hash_backend", self.hash_backend, HASH_BACKENDS)
        check_choice("kernel", self.kernel, KERNELS)
        self.check_precision()
        self.check_budget()
        if self.budget is not None and (self.memory_fraction is not None or self.num_rows is not None):
            raise ValueError("set embeddings.options.budget or memory_fraction/num_rows, not both")

    @property
    def needs_table_sizes(self) -> bool:
        return self.num_rows is None


class HashLayout(RemapLayout):
    """One ``rows_f x dim`` table per feature, ``hash_<feature>``; ids mapped to rows in ``expand``."""

    method = "hash"

    def __init__(self, ctx: SparseArchContext, options: HashOptions, table_prefix: str = "hash") -> None:
        super().__init__(ctx.feature_names, ctx.embedding_dim, table_prefix)
        self.options = options
        if options.budget is not None:
            self.rows = self._budget_rows(ctx, options)
        elif options.num_rows is not None:
            self.rows = [options.num_rows] * len(self.feature_names)
        else:
            fraction = DEFAULT_MEMORY_FRACTION if options.memory_fraction is None else options.memory_fraction
            self.rows = [sized_rows(int(n), fraction, 1, 1) for n in ctx.table_sizes(where("memory_fraction"))]

    def _budget_rows(self, ctx: SparseArchContext, options: HashOptions) -> List[int]:
        """Hashed rows per feature from the byte budget (sets the hot set first)."""
        assert options.budget is not None
        row_bytes = self.embedding_dim * options.element_bytes
        hot = select_hot(ctx, options, row_bytes)
        self.hot = HotLookup(hot)
        fixed = 3 * 8 * len(self.feature_names) + hot_bytes(hot) + hot.total * row_bytes  # salts, rows, wrap
        tail = remaining(budget_bytes(ctx, options.budget), fixed, "the hot rows and buffers") // row_bytes
        left = [max(0, int(n) - h) for n, h in zip(ctx.table_sizes(where("budget")), hot.sizes())]
        return split_rows(tail, left, "the hashed tables")

    def table_name(self, feature: str) -> str:
        return f"{self.table_prefix}_{feature}"

    def inner_configs(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name=self.table_name(f), embedding_dim=self.embedding_dim, num_embeddings=rows + hot,
                               feature_names=[f], pooling=pooling_type(self.options.pooling),
                               init_fn=uniform_init(rows + hot), data_type=self.options.data_type)
            for f, rows, hot in zip(self.feature_names, self.rows, self.hot.sizes)
        ]

    def logical_configs(self) -> List[EmbeddingBagConfig]:
        return self.inner_configs()

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        return {self.table_name(f): [float(pf)] for f, pf in zip(self.feature_names, pooling_factors)}

    def buffers(self, device: torch.device) -> Dict[str, torch.Tensor]:
        features = torch.arange(len(self.feature_names), dtype=torch.int64)
        return {"hash_salts": hash_salt(features, self.options.seed, 0).to(device),
                "hash_rows": torch.tensor(self.rows, dtype=torch.int64, device=device),
                "hash_wrap": torch.tensor(wrap_of(self.rows), dtype=torch.int64, device=device)}

    def expand(self, features: KeyedJaggedTensor, buffers: Mapping[str, torch.Tensor],
               stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, Aux]:
        features = self.select_features(features)
        values = features.values().to(torch.int64)
        feature_of_value, _ = feature_of_values(features.lengths(), len(self.feature_names), values.numel())
        mapped = self.fused_addresses(values, feature_of_value, buffers)[:, 0]
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=mapped, lengths=features.lengths(),
                                stride=features.stride())
        return kjt, None

    def fused_addresses(self, values: torch.Tensor, feature_of_value: torch.Tensor,
                        buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Every id's row, [n, 1]: hashed (or ``x mod rows_f`` for ``hash: identity``), hot values' own rows over
        them (hot value i of feature f: row rows_f + i)."""
        if self.options.hash == "identity":
            mapped = torch.remainder(values, buffers["hash_rows"][feature_of_value])
        else:
            mapped = salted_hash(values, feature_of_value, buffers["hash_salts"], rows=buffers["hash_rows"],
                                 wrap=buffers["hash_wrap"], backend=self.options.hash_backend)
        if self.hot.total:
            hit, index = self.hot.lookup(values, feature_of_value, buffers)
            mapped = torch.where(hit, buffers["hash_rows"][feature_of_value] + index, mapped)
        return mapped[:, None]

    def fused_plan(self, buffers: Mapping[str, torch.Tensor]) -> Optional[Tuple[BagArgs, List[str], bool]]:
        """One table per feature, one chunk of ``dim`` floats per id; hot value i of feature f is row rows_f + i."""
        rows = buffers["hash_rows"]
        mix = self.options.hash == "mix"
        args = BagArgs(table_of_feature=self.cached("features", list(range(len(self.feature_names))), rows.device),
                       num_chunks=1, pooling=1 if self.options.pooling == "mean" else 0,
                       salts=buffers["hash_salts"][:, None] if mix else None, rows=rows,
                       **(self.hot_kernel_args(buffers, rows) if mix else {}))
        return args, [self.table_name(f) for f in self.feature_names], mix


class HashedEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """The hashing trick; drop-in for an EmbeddingBagCollection (KJT of raw int64 ids in)."""

    layout: HashLayout

    def __init__(self, ctx: SparseArchContext, options: HashOptions, table_prefix: str = "hash") -> None:
        super().__init__(HashLayout(ctx, options, table_prefix), ctx.device,
                         ctx.all_pooling_factors())


SPEC = remapped_spec(
    "hash", HashOptions, HashedEmbeddingBagCollection,
    "hashing trick: raw ids hashed into a smaller table per feature",
)
