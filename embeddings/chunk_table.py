"""The chunk table that ROBE-Z and LMA address: one shared array of ``M`` floats per feature group, stored as a
``[M / Z, Z]`` table (a TorchRec table that fbgemm's TBE looks up and TorchRec shards row-wise). An id's
``dim``-wide embedding is ``C = dim / Z`` chunks of ``Z`` contiguous floats; chunk ``c`` of raw id ``x`` of feature
``f`` is row ``A(f, x, c)`` of the table.

:class:`ChunkLayout` looks the chunks up as ``C`` inner features per original feature, ``<feature>__c<c>``,
all on the group's table and pooled like the original feature (SUM or MEAN): the pooled chunk ``c`` of a
bag is the pooled ``c``-th slice of its ids' embeddings, because every id adds exactly one lookup to every
chunk feature. The ``C`` pooled chunks, concatenated, give one ``dim``-wide vector per original feature.

Addresses (:class:`ChunkAddresser`):

- ``mix`` (ROBE-Z, :class:`RandomChunkAddresser`):
  ``A(f, x, c) = hash_to_range(x, f, seed, c, rows_g)`` (``embeddings.hashing``, ``f`` = feature index):
  the chunk index is mixed in, so the chunks of one id land independently.
- ``identity`` (:class:`IdentityChunkAddresser`): ``A(f, x, c) = (offset_f + x mod n_f) * C + c`` with
  ``offset_f`` the full-table rows of the group's earlier features: the full tables laid out chunk by chunk.
  Needs ``rows_g >= C * sum(n_f)``; the module is then exactly an EmbeddingBagCollection over ids mod n_f.
- ``embeddings.lma`` supplies minhash addresses for indexed values, with ``mix`` as the fallback.

With ``budget`` (``embeddings.budget``) the arrays are sized from bytes: ``hot_share`` buys hot rows (exact rows for
the most frequent ids, ``embeddings.hot_rows``): the C chunks of hot value ``i`` of feature ``f`` are the rows
``base_f + C * i + c`` after the group's ``rows_g`` addressed rows, so a hot id never shares memory. The rest of the
budget, less every buffer (salts, moduli, an LMA dictionary), is the addressed rows, split over the groups in
proportion to their full rows not covered by hot rows.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.budget import BudgetOptions, PrecisionOptions, budget_bytes, remaining, select_hot, split_rows
from embeddings.remap import (
    KERNELS,
    POOLINGS,
    Aux,
    FeatureGroups,
    RemapLayout,
    check_choice,
    check_int,
    check_memory,
    feature_of_values,
    group_rows,
    pooling_type,
    uniform_init,
    where,
    wrap_of,
)
from embeddings.hashing import HASH_BACKENDS, hash_salt
from embeddings.id_hash import salted_hash
from embeddings.ops.chunk_bag import BagArgs
from embeddings.hot_rows import HotLookup, HotSet, hot_bytes
from embeddings.types import SparseArchContext


@dataclass
class ChunkedOptions(BudgetOptions, PrecisionOptions):
    """Options shared by the chunk-table methods (``robe``, ``lma``).

    - ``memory_fraction``: floats of the shared array(s) / floats of the full tables (default 1/16 when
      ``num_rows`` is null too); per group, of that group's full tables.
    - ``num_rows``: explicit rows of ``Z`` floats of the array (split over groups by full-table size).
    - ``chunk_size`` (Z): floats per chunk, dividing ``model.embedding_dim``; null = the whole embedding
      (one chunk per id). Sharded (fused TBE) tables need a multiple of 4; ``1`` is the element-level
      (HashedNets-style) reference path for single-process use.
    - ``feature_groups``: null = one array for all features (the papers' setting); else a list of lists of
      feature names, each group with its own array (every feature in exactly one group).
    - ``pooling``: "sum" or "mean" over the ids of a multi-hot bag (an empty bag gives zeros).
    - ``seed``: hash seed in [0, 2**63).
    - ``hash_backend``: "torch" (int64 tensor ops, any device) or "fused" (one-pass C kernel compiled at
      first use, CPU tensors only; same bits; falls back to "torch", logged, where it cannot run).
    - ``kernel``: "auto" (the unsharded module runs its whole embedding stage - hot rows, hashes, addresses,
      gather, pooling, and in training the backward with the fused optimizer - in one fused operator,
      ``embeddings.ops.chunk_bag``, where its C++ kernel runs: CPU tensors; the inner EmbeddingBagCollection
      elsewhere) or "tbe" (always the inner EmbeddingBagCollection); results are equal (tests/embeddings/test_chunk_bag.py).
    - ``budget``, ``hot_share``, ``hot_min_count``: see ``embeddings.budget.BudgetOptions`` (``budget``
      replaces ``memory_fraction`` / ``num_rows``).
    - ``precision``: "fp32" or "fp16" storage of the arrays, hot rows included (they are rows of the same tables):
      see ``embeddings.budget.PrecisionOptions``.
    """

    memory_fraction: Optional[float] = None
    num_rows: Optional[int] = None
    chunk_size: Optional[int] = None
    feature_groups: Optional[List[List[str]]] = None
    pooling: str = "sum"
    seed: int = 0
    hash_backend: str = "torch"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_memory(self.memory_fraction, self.num_rows)
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 1)
        check_choice("pooling", self.pooling, POOLINGS)
        check_int("seed", self.seed, 0, (1 << 63) - 1)
        check_choice("hash_backend", self.hash_backend, HASH_BACKENDS)
        check_choice("kernel", self.kernel, KERNELS)
        self.check_precision()
        self.check_budget()
        if self.budget is not None and (self.memory_fraction is not None or self.num_rows is not None):
            raise ValueError("set embeddings.options.budget or memory_fraction/num_rows, not both")

    @property
    def needs_table_sizes(self) -> bool:
        """Sized in rows of one array, the full sizes are needed only to split rows over feature groups."""
        return self.num_rows is None or self.feature_groups is not None


class ChunkAddresser(abc.ABC):
    """Where the chunks of each id live: ``rows(...)`` -> ``[n, C]`` int64 rows of the group tables."""

    @abc.abstractmethod
    def buffers(self, layout: "ChunkLayout", device: torch.device) -> Dict[str, torch.Tensor]:
        """The buffers ``rows`` reads (replicated, non-persistent)."""

    @abc.abstractmethod
    def rows(self, layout: "ChunkLayout", values: torch.Tensor, feature_of_value: torch.Tensor,
             buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rows of every chunk of every raw id."""


class RandomChunkAddresser(ChunkAddresser):
    """ROBE-Z: ``A(f, x, c) = hash_to_range(x, f, seed, c, rows_g)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def buffers(self, layout: "ChunkLayout", device: torch.device) -> Dict[str, torch.Tensor]:
        features = torch.arange(len(layout.feature_names), dtype=torch.int64)[:, None]
        chunks = torch.arange(layout.num_chunks, dtype=torch.int64)[None, :]
        return {"chunk_salts": hash_salt(features, self.seed, chunks).to(device)}

    def rows(self, layout: "ChunkLayout", values: torch.Tensor, feature_of_value: torch.Tensor,
             buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return salted_hash(values, feature_of_value, buffers["chunk_salts"], rows=buffers["chunk_rows"],
                           wrap=buffers["chunk_wrap"], backend=layout.options.hash_backend)


class IdentityChunkAddresser(ChunkAddresser):
    """``A(f, x, c) = (offset_f + x mod n_f) * C + c``: no sharing, the full tables chunk by chunk."""

    def __init__(self, layout_rows: Sequence[int], full_rows: Sequence[int], groups: FeatureGroups,
                 num_chunks: int) -> None:
        offsets: List[int] = []
        used = [0] * len(groups.groups)
        for n, g in zip(full_rows, groups.group_of_feature):
            offsets.append(used[g])
            used[g] += int(n)
        for g, rows in enumerate(layout_rows):
            if rows < used[g] * num_chunks:
                raise ValueError(f"{where('hash')} 'identity' needs at least {used[g] * num_chunks} rows in group {g} "
                                 f"(its full tables, chunk by chunk), got {rows}; raise {where('num_rows')} or "
                                 f"{where('memory_fraction')}")
        self.offsets = offsets
        self.full_rows = [int(n) for n in full_rows]

    def buffers(self, layout: "ChunkLayout", device: torch.device) -> Dict[str, torch.Tensor]:
        return {"identity_offsets": torch.tensor(self.offsets, dtype=torch.int64, device=device),
                "identity_sizes": torch.tensor(self.full_rows, dtype=torch.int64, device=device)}

    def rows(self, layout: "ChunkLayout", values: torch.Tensor, feature_of_value: torch.Tensor,
             buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        local = torch.remainder(values, buffers["identity_sizes"][feature_of_value])
        base = (buffers["identity_offsets"][feature_of_value] + local) * layout.num_chunks
        chunks = torch.arange(layout.num_chunks, dtype=torch.int64, device=values.device)
        return base[:, None] + chunks[None, :]


class ChunkLayout(RemapLayout):
    """The chunk tables: ``C`` inner features ``<feature>__c<c>`` per feature on its group's ``[rows, Z]`` table.

    ``extra_bytes(hot)``: bytes of buffers the method's addresser will add (an LMA dictionary), counted in the
    budget before the arrays are sized.
    """

    def __init__(self, ctx: SparseArchContext, options: ChunkedOptions, table_prefix: str, method: str,
                 extra_bytes: Callable[[HotSet], int] = lambda hot: 0) -> None:
        super().__init__(ctx.feature_names, ctx.embedding_dim, table_prefix)
        self.method = method
        dim = ctx.embedding_dim
        self.chunk_size = dim if options.chunk_size is None else options.chunk_size
        if dim % self.chunk_size:
            raise ValueError(f"{where('chunk_size')}={self.chunk_size} must divide model.embedding_dim={dim}")
        self.num_chunks = dim // self.chunk_size
        self.options = options
        self.groups = FeatureGroups.resolve(self.feature_names, options.feature_groups)
        needs_sizes = (options.num_rows is None or len(self.groups.groups) > 1
                       or getattr(options, "hash", "mix") == "identity")
        self.full_rows = ctx.table_sizes(f"{method} sized by {where('memory_fraction')}/{where('budget')}, "
                                         "feature groups or hash 'identity'") if needs_sizes else []
        if options.budget is not None:
            self.rows_per_group = self._budget_rows(ctx, options, extra_bytes)
        else:
            self.rows_per_group = group_rows(self.groups, self.full_rows, dim, self.chunk_size,
                                             options.memory_fraction, options.num_rows)
        self.inner_keys = [self.chunk_feature(f, c) for f in self.feature_names for c in range(self.num_chunks)]
        self.addresser: ChunkAddresser = RandomChunkAddresser(options.seed)

    def _budget_rows(self, ctx: SparseArchContext, options: ChunkedOptions,
                     extra_bytes: Callable[[HotSet], int]) -> List[int]:
        """Addressed rows per group from the byte budget (sets the hot set first)."""
        assert options.budget is not None
        element = options.element_bytes
        hot = select_hot(ctx, options, self.embedding_dim * element)
        self.hot = HotLookup(hot)
        count = len(self.feature_names)
        own = 8 * count * (2 + self.num_chunks + (1 if hot.total else 0))  # moduli, wraps, salts, hot bases
        fixed = own + hot_bytes(hot) + hot.total * self.embedding_dim * element + extra_bytes(hot)
        rows = remaining(budget_bytes(ctx, options.budget), fixed, "the hot rows and buffers")
        rows //= self.chunk_size * element
        left = [max(0, int(n) - h) for n, h in zip(self.full_rows, hot.sizes())]
        weights = [sum(left[i] for i, g in enumerate(self.groups.group_of_feature) if g == gi)
                   for gi in range(len(self.groups.groups))]
        return split_rows(rows, weights, f"the {self.method} arrays")

    @property
    def hot_per_group(self) -> List[int]:
        sizes = self.hot.sizes
        return [sum(sizes[i] for i, g in enumerate(self.groups.group_of_feature) if g == gi)
                for gi in range(len(self.groups.groups))]

    @property
    def table_rows_per_group(self) -> List[int]:
        """Rows of each group table: the addressed rows, then C rows per hot value of the group."""
        return [rows + self.num_chunks * hot for rows, hot in zip(self.rows_per_group, self.hot_per_group)]

    def hot_bases(self) -> List[int]:
        """Row of chunk 0 of each feature's first hot value in its group table."""
        bases, used = [], [0] * len(self.groups.groups)
        for f, g in enumerate(self.groups.group_of_feature):
            bases.append(self.rows_per_group[g] + self.num_chunks * used[g])
            used[g] += self.hot.sizes[f]
        return bases

    @staticmethod
    def chunk_feature(feature: str, chunk: int) -> str:
        return f"{feature}__c{chunk}"

    def table_name(self, group: int) -> str:
        return f"{self.table_prefix}_memory" if len(self.groups.groups) == 1 else f"{self.table_prefix}_memory_{group}"

    def feature_rows(self) -> List[int]:
        """Addressed rows of each feature's group table (the modulus of its chunk addresses)."""
        return [self.rows_per_group[g] for g in self.groups.group_of_feature]

    def inner_configs(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=self.table_name(g), embedding_dim=self.chunk_size, num_embeddings=rows,
                feature_names=[self.chunk_feature(f, c) for f in group for c in range(self.num_chunks)],
                pooling=pooling_type(self.options.pooling), init_fn=uniform_init(rows),
                data_type=self.options.data_type,
            )
            for g, (group, rows) in enumerate(zip(self.groups.groups, self.table_rows_per_group))
        ]

    def logical_configs(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name=self.table_name(g), embedding_dim=self.embedding_dim, num_embeddings=rows,
                               feature_names=list(group), pooling=pooling_type(self.options.pooling))
            for g, (group, rows) in enumerate(zip(self.groups.groups, self.table_rows_per_group))
        ]

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        pf = dict(zip(self.feature_names, pooling_factors))
        return {self.table_name(g): [float(pf[f]) for f in group for _ in range(self.num_chunks)]
                for g, group in enumerate(self.groups.groups)}

    def buffers(self, device: torch.device) -> Dict[str, torch.Tensor]:
        rows = self.feature_rows()
        out = {"chunk_rows": torch.tensor(rows, dtype=torch.int64, device=device),
               "chunk_wrap": torch.tensor(wrap_of(rows), dtype=torch.int64, device=device)}
        if self.hot.total:
            out["chunk_hot_base"] = torch.tensor(self.hot_bases(), dtype=torch.int64, device=device)
        out.update(self.addresser.buffers(self, device))
        return out

    def expand(self, features: KeyedJaggedTensor, buffers: Mapping[str, torch.Tensor],
               stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, Aux]:
        features = self.select_features(features)
        num_features, batch, chunks = len(self.feature_names), features.stride(), self.num_chunks
        values = features.values().to(torch.int64)
        lengths = features.lengths()
        n = values.numel()
        feature_of_value, per_feature = feature_of_values(lengths, num_features, n)
        rows = self.fused_addresses(values, feature_of_value, buffers)  # [n, C]
        # feature-major, then chunk-major: chunk c of value i of feature f goes to
        # C * start_f + c * n_f + (i - start_f)
        starts = torch.cumsum(per_feature, 0) - per_feature
        first = starts[feature_of_value]
        position = torch.arange(n, dtype=torch.int64, device=values.device) - first
        chunk = torch.arange(chunks, dtype=torch.int64, device=values.device)[None, :]
        target = (chunks * first + position)[:, None] + chunk * per_feature[feature_of_value][:, None]
        out = torch.empty(n * chunks, dtype=torch.int64, device=values.device)
        out[target.reshape(-1)] = rows.reshape(-1)
        kjt = KeyedJaggedTensor(
            keys=self.inner_keys, values=out, stride=batch,
            lengths=lengths.view(num_features, 1, batch).expand(num_features, chunks, batch).reshape(-1),
        )
        return kjt, None

    def fused_addresses(self, values: torch.Tensor, feature_of_value: torch.Tensor,
                        buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rows [n, C] of every chunk of every id: the addresser's, hot values' own rows over them."""
        rows = self.addresser.rows(self, values, feature_of_value, buffers)
        if self.hot.total:  # chunk c of hot value i of feature f: row base_f + C * i + c
            hit, index = self.hot.lookup(values, feature_of_value, buffers)
            chunk_of = torch.arange(self.num_chunks, dtype=torch.int64, device=values.device)[None, :]
            hot_rows = (buffers["chunk_hot_base"][feature_of_value] + self.num_chunks * index)[:, None] + chunk_of
            rows = torch.where(hit[:, None], hot_rows, rows)
        return rows

    def fused_plan(self, buffers: Mapping[str, torch.Tensor]) -> Optional[Tuple[BagArgs, List[str], bool]]:
        """Every chunk layout runs fused: ROBE-Z's random addresses inside the operator, any other addresser's
        (LMA's dictionary, identity) computed first and passed in."""
        device = buffers["chunk_rows"].device
        random = type(self.addresser) is RandomChunkAddresser
        hot = self.hot_kernel_args(buffers, buffers["chunk_hot_base"]) if random and self.hot.total else {}
        args = BagArgs(table_of_feature=self.cached("groups", self.groups.group_of_feature, device),
                       num_chunks=self.num_chunks, pooling=1 if self.options.pooling == "mean" else 0,
                       salts=buffers["chunk_salts"] if random else None, rows=buffers["chunk_rows"], **hot)
        return args, [self.table_name(g) for g in range(len(self.groups.groups))], random

    def finish(self, kt: KeyedTensor, aux: Aux) -> KeyedTensor:
        values = kt.values()
        keys = kt.keys()
        if keys != self.inner_keys:  # a sharded EBC orders its output by sharding group
            values = values.index_select(1, self._column_order(keys, values.device))
        return KeyedTensor(keys=self.feature_names, length_per_key=[self.embedding_dim] * len(self.feature_names),
                           values=values)

    def _column_order(self, keys: List[str], device: torch.device) -> torch.Tensor:
        position = {k: i for i, k in enumerate(keys)}
        z = self.chunk_size
        columns = [position[k] * z + j for k in self.inner_keys for j in range(z)]
        return self.cached("columns", columns, device)
