"""Id-remapping embedding modules: an inner TorchRec EmbeddingBagCollection behind a parameterless id map.

Every compressed method of this package except MEM-REC (``hash``, ``robe``, ``lma``, ``qr``) is one
:class:`RemapLayout` - pure id maths - composed with an inner EBC (:class:`RemappedEmbeddingBagCollection`),
so that ``sharding.remap`` shards the inner EBC with TorchRec's own sharder (fbgemm TBE lookups, fused
optimizers). A layout has two steps:

1. ``expand(features, buffers)`` - data-parallel side, no autograd: raw-id KJT -> the KJT of table rows the
   inner EBC looks up (plus an optional ``aux`` dict of tensors for step 2). A sharded module runs it in
   ``input_dist``, before the inner EBC's input dist, so row-wise bucketing routes on the mapped rows.
2. ``finish(kt, aux)`` - after the output dist: the module's KeyedTensor, one ``embedding_dim`` vector per
   original feature.

The chunk-table layout shared by ROBE-Z and LMA is ``embeddings.chunk_table.ChunkLayout``; this file holds what all
four methods share: the base classes, option checks, memory sizing, per-element modulus, spec helpers.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.ops import chunk_bag
from embeddings.quant import InferenceForm, register_form
from embeddings.checks import check_choice, check_int, check_layout_args, select_features, where  # noqa: F401 (re-exported)
from embeddings.hashing import MAX_BUCKETS
from embeddings.hot_rows import HotLookup, HotSet
from embeddings.inference_state import default_hooks
from embeddings.types import (
    MemoryReport,
    SparseArchContext,
    SparseArchSpec,
    TableMemory,
    TopologyInfo,
    full_table_bytes,
    optimizer_state_bytes,
    table_memory,
)

Aux = Optional[Dict[str, torch.Tensor]]
DEFAULT_MEMORY_FRACTION = 1.0 / 16  # the LMA paper's main budget
POOLINGS = ("sum", "mean")
KERNELS = ("auto", "tbe")


# ---- option checks (errors name embeddings.options.<field>) -------------------------------------------
def check_memory(memory_fraction: Optional[float], num_rows: Optional[int]) -> None:
    """At most one of the two sizes; neither = :data:`DEFAULT_MEMORY_FRACTION`."""
    if memory_fraction is not None and num_rows is not None:
        raise ValueError(f"set {where('memory_fraction')} or {where('num_rows')}, not both "
                         f"(got {memory_fraction} and {num_rows})")
    if memory_fraction is not None:
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)):
            raise TypeError(f"{where('memory_fraction')} must be a number, got {memory_fraction!r}")
        if not 0.0 < float(memory_fraction) <= 1e6:
            raise ValueError(f"{where('memory_fraction')} must be in (0, 1e6], got {memory_fraction}")
    if num_rows is not None:
        check_int("num_rows", num_rows, 1, MAX_BUCKETS)


def sized_rows(full_rows: int, fraction: float, width: int, dim: int) -> int:
    """Rows of ``width`` floats holding ``fraction`` of a ``full_rows x dim`` table (at least 1)."""
    return max(1, int(round(fraction * full_rows * dim / width)))


# ---- hashing helpers --------------------------------------------------------------------------------
def wrap_of(rows: Sequence[int]) -> List[int]:
    """``2**64 mod n`` for each n: what :func:`unsigned_mod_rows` adds to negative int64 hashes."""
    return [(1 << 64) % int(n) for n in rows]


def unsigned_mod_rows(h: torch.Tensor, rows: torch.Tensor, wrap: torch.Tensor) -> torch.Tensor:
    """``embeddings.hashing.unsigned_mod`` with a per-element modulus: ``h`` read as unsigned mod ``rows``.

    ``rows`` (in [1, 2**62]) and ``wrap = 2**64 mod rows`` broadcast against ``h`` (see :func:`wrap_of`).
    """
    r = torch.remainder(h, rows)
    return torch.where(h < 0, torch.remainder(r + wrap, rows), r)


def feature_of_values(lengths: torch.Tensor, num_features: int, num_values: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(feature index of every value of a feature-major KJT, values per feature), computed on device."""
    per_feature = lengths.view(num_features, -1).sum(1).to(torch.int64)
    features = torch.arange(num_features, dtype=torch.int64, device=lengths.device)
    return torch.repeat_interleave(features, per_feature, output_size=num_values), per_feature


# ---- the generic layout and module ------------------------------------------------------------------
class RemapLayout(abc.ABC):
    """Parameterless id maths of one method; shared by the module and its sharded form."""

    method = "remap"

    def __init__(self, feature_names: Sequence[str], embedding_dim: int, table_prefix: str) -> None:
        names = check_layout_args(feature_names, embedding_dim, table_prefix)
        self.feature_names: List[str] = names
        self.embedding_dim = embedding_dim
        self.table_prefix = table_prefix
        self._index = {f: i for i, f in enumerate(names)}
        self._cache: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self.hot = HotLookup(HotSet.empty(names))  # hot rows (embeddings.hot_rows); none unless a method sets them

    @abc.abstractmethod
    def inner_configs(self) -> List[EmbeddingBagConfig]:
        """Tables of the inner EmbeddingBagCollection."""

    @abc.abstractmethod
    def logical_configs(self) -> List[EmbeddingBagConfig]:
        """What ``embedding_bag_configs()`` reports: the original features, ``embedding_dim`` wide (DLRM reads
        feature names and the dim from it). ``num_embeddings`` is the physical row count of the table(s)."""

    @abc.abstractmethod
    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        """Inner table name -> lookups per sample of each of its features, from raw ids per sample."""

    def buffers(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The method's replicated, non-persistent buffers (salts, dictionaries) on ``device`` (shapes only on
        ``meta``); the hot-row lookup's buffers come on top (:meth:`all_buffers`)."""
        return {}

    def set_hot(self, hot: HotSet) -> None:
        """Give ``hot``'s values exact rows of their own, appended after the method's rows (each layout's
        ``expand`` places them; an empty set leaves the layout as it was)."""
        if list(hot.feature_names) != self.feature_names:
            raise ValueError(f"hot set features {list(hot.feature_names)} differ from the layout's {self.feature_names}")
        self.hot = HotLookup(hot)

    def all_buffers(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """Every buffer a module of this layout keeps: the method's and the hot-row lookup's."""
        return {**self.buffers(device), **self.hot.buffers(device)}

    @abc.abstractmethod
    def expand(self, features: KeyedJaggedTensor, buffers: Mapping[str, torch.Tensor],
               stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, Aux]:
        """Raw-id KJT -> inner-EBC KJT (call under ``torch.no_grad()``).

        ``stride``: only for layouts whose inner stride depends on the data (:meth:`local_stride` is not
        None): the inner KJT's stride, at least the local one, padded with empty bags. A sharded module
        passes the maximum over ranks, because a row-wise output dist with unequal batches per rank needs
        an uneven all-gather in backward, which gloo lacks.
        """

    def local_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        """The inner KJT's stride when it depends on the data (QR: ids in the batch), else None."""
        return None

    def finish(self, kt: KeyedTensor, aux: Aux) -> KeyedTensor:
        """Inner EBC output -> module output (default: unchanged)."""
        return kt

    def fused_plan(self, buffers: Mapping[str, torch.Tensor]) -> Optional[Tuple[chunk_bag.BagArgs, List[str], bool]]:
        """(operator arguments, inner table names in table order, whether the operator computes the addresses itself)
        when this layout's lookup can run on ``compactrec::chunk_bag_forward``, else None (the inner EBC runs)."""
        return None

    def fused_addresses(self, values: torch.Tensor, feature_of_value: torch.Tensor,
                        buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rows [N, C] of every chunk of every id, for a fused plan whose operator takes addresses."""
        raise NotImplementedError(f"{self.method}: no fused addresses")

    def hot_kernel_args(self, buffers: Mapping[str, torch.Tensor], base: torch.Tensor) -> Dict[str, Any]:
        """The hot-row arguments of :class:`embeddings.ops.chunk_bag.BagArgs` (none without hot rows)."""
        if not self.hot.total:
            return {}
        out: Dict[str, Any] = {"hot_keys": buffers["hot_keys"], "hot_slots": buffers["hot_slots"],
                               "hot_starts": buffers["hot_starts"], "hot_shift": self.hot.shift, "hot_base": base}
        if self.hot.mode == "verified":
            out["hot_values"], out["hot_salts"] = buffers["hot_values"], buffers["hot_salts"]
        return out

    def check_shardable(self) -> None:
        """Raise if the inner tables cannot run on the fused TBE kernel (dims must be multiples of 4)."""
        bad = sorted({c.embedding_dim for c in self.inner_configs() if c.embedding_dim % 4})
        if bad:
            raise ValueError(f"{self.method}: inner table widths {bad} are not multiples of 4, which fbgemm's fused "
                             "TBE kernel (every sharded table) needs; use a chunk size/dim that is a multiple of 4")

    # ---- shared helpers ---------------------------------------------------------------------------
    def select_features(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` restricted to and ordered as this layout's features (checks shape only)."""
        return select_features(features, self.feature_names, self.method)

    def cached(self, tag: str, values: List[int], device: torch.device) -> torch.Tensor:
        key = (tag, str(device), tuple(values))
        tensor = self._cache.get(key)
        if tensor is None:
            tensor = torch.tensor(values, dtype=torch.int64, device=device)
            self._cache[key] = tensor
        return tensor


class RemappedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """KJT of raw int64 ids in, KeyedTensor out: ``layout.expand`` -> inner ``ebc`` -> ``layout.finish``.

    State: ``ebc`` (the inner EmbeddingBagCollection, whose tables are the only parameters) and the
    layout's non-persistent buffers. The sharded module has the same names, so state dicts interchange.
    ``pooling_factors`` (raw ids per sample and feature) are planner hints only.
    """

    def __init__(self, layout: RemapLayout, device: Optional[torch.device] = None,
                 pooling_factors: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.layout = layout
        count = len(layout.feature_names)
        factors = [1.0] * count if pooling_factors is None else [float(p) for p in pooling_factors]
        if len(factors) != count:
            raise ValueError(f"pooling_factors has {len(factors)} entries for {count} features")
        self.pooling_factors: List[float] = factors
        self.ebc = EmbeddingBagCollection(tables=layout.inner_configs(), device=device)
        self._buffer_names: List[str] = []
        for name, tensor in layout.all_buffers(device).items():
            self.register_buffer(name, tensor, persistent=False)
            self._buffer_names.append(name)

    def layout_buffers(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._buffer_names}

    def uses_fused_kernel(self, device: torch.device) -> bool:
        """Whether ``forward`` runs the fused operator (``kernel: auto``, CPU, the C++ library built, a fused plan)."""
        return self._fused_plan(device) is not None

    def _fused_plan(self, device: torch.device) -> Optional[Tuple[chunk_bag.BagArgs, List[str], bool]]:
        options = getattr(self.layout, "options", None)
        if getattr(options, "kernel", "tbe") != "auto" or device.type != "cpu" or not chunk_bag.available():
            return None
        if type(self.ebc) is not EmbeddingBagCollection:  # a quantized inner EBC (inference) runs fbgemm's kernel
            return None
        return self.layout.fused_plan(self.layout_buffers())

    def fused_weights(self, names: Sequence[str]) -> List[torch.Tensor]:
        return [self.ebc.embedding_bags[name].weight for name in names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        plan = self._fused_plan(features.values().device)
        if plan is not None:
            return self._fused_forward(features, plan)
        with torch.no_grad():
            kjt, aux = self.layout.expand(features, self.layout_buffers())
        return self.layout.finish(self.ebc(kjt), aux)

    def _fused_forward(self, features: KeyedJaggedTensor,
                       plan: Tuple[chunk_bag.BagArgs, List[str], bool]) -> KeyedTensor:
        layout, buffers = self.layout, self.layout_buffers()
        args, names, computes_addresses = plan
        features = layout.select_features(features)
        values, lengths = features.values().to(torch.int64), features.lengths()
        addresses = None
        if not computes_addresses:
            with torch.no_grad():
                feature_of_value, _ = feature_of_values(lengths, len(layout.feature_names), values.numel())
                addresses = layout.fused_addresses(values, feature_of_value, buffers)
        out = chunk_bag.lookup(self.fused_weights(names), values, lengths, args, addresses)
        return KeyedTensor(keys=layout.feature_names, length_per_key=[layout.embedding_dim] * len(layout.feature_names),
                           values=out)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.layout.logical_configs()

    def is_weighted(self) -> bool:
        return False


# ---- spec helpers shared by the methods --------------------------------------------------------------
def as_remapped(module: nn.Module) -> RemappedEmbeddingBagCollection:
    if not isinstance(module, RemappedEmbeddingBagCollection):
        raise TypeError(f"expected an id-remapping embedding module, got {type(module).__name__}")
    return module


def row_wise_constraints(module: nn.Module, topology: TopologyInfo) -> Dict[str, ParameterConstraints]:
    """Every inner table row_wise (table_row_wise on several nodes, table_wise on a single rank), fused, with its
    true pooling factors."""
    remapped = as_remapped(module)
    remapped.layout.check_shardable()
    factors = remapped.layout.planner_pooling_factors(remapped.pooling_factors)
    return {
        config.name: ParameterConstraints(
            sharding_types=[topology.row_sharding_type()],
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            pooling_factors=factors[config.name],
        )
        for config in remapped.layout.inner_configs()
    }


def remapped_memory(module: nn.Module, ctx: SparseArchContext, sparse_optimizer: str) -> MemoryReport:
    """Exact bytes: every inner table (fused optimizer state on top) and every buffer (dictionaries, salts)."""
    remapped = as_remapped(module)
    tables: List[TableMemory] = [
        table_memory(config.name, remapped.ebc.embedding_bags[config.name].weight, "parameter")
        for config in remapped.layout.inner_configs()
    ]
    tables += [table_memory(name, buffer, "buffer") for name, buffer in remapped.named_buffers()]
    state = sum(optimizer_state_bytes(t.rows, t.cols, sparse_optimizer) for t in tables if t.kind == "parameter")
    return MemoryReport(tables=tables, optimizer_state_bytes=state, full_table_bytes=full_table_bytes(ctx))


def uniform_init(rows: int) -> Any:
    """TorchRec's default initialisation for a table of ``rows`` rows: U(+-sqrt(1/rows))."""
    bound = math.sqrt(1.0 / rows)
    return partial(torch.nn.init.uniform_, a=-bound, b=bound)


def pooling_type(pooling: str) -> PoolingType:
    return PoolingType.MEAN if pooling == "mean" else PoolingType.SUM


@dataclass(frozen=True)
class FeatureGroups:
    """Which features share one table: ``group_of_feature[i]`` indexes ``groups``."""

    groups: List[List[str]]
    group_of_feature: List[int]

    @staticmethod
    def resolve(feature_names: Sequence[str], groups: Optional[Sequence[Sequence[str]]]) -> "FeatureGroups":
        names = list(feature_names)
        if groups is None:
            return FeatureGroups([names], [0] * len(names))
        if not groups or any(not g for g in groups):
            raise ValueError(f"{where('feature_groups')} must be null or a list of non-empty lists, got {groups!r}")
        seen: Dict[str, int] = {}
        for gi, group in enumerate(groups):
            for f in group:
                if f not in names:
                    raise ValueError(f"{where('feature_groups')}: unknown feature {f!r} (features: {', '.join(names)})")
                if f in seen:
                    raise ValueError(f"{where('feature_groups')}: feature {f!r} is in groups {seen[f]} and {gi}")
                seen[f] = gi
        missing = [f for f in names if f not in seen]
        if missing:
            raise ValueError(f"{where('feature_groups')}: features {missing} are in no group")
        ordered = [[f for f in names if seen[f] == gi] for gi in range(len(groups))]
        return FeatureGroups(ordered, [seen[f] for f in names])


def group_rows(groups: FeatureGroups, full_rows: Sequence[int], dim: int, width: int,
               memory_fraction: Optional[float], num_rows: Optional[int]) -> List[int]:
    """Rows (of ``width`` floats) of each group's table: a fraction of the group's full tables, or
    ``num_rows`` split over the groups in proportion to their full-table sizes (at least 1 each)."""
    if num_rows is not None and len(groups.groups) == 1:
        return [num_rows]
    full = [sum(int(full_rows[i]) for i, g in enumerate(groups.group_of_feature) if g == gi)
            for gi in range(len(groups.groups))]
    if num_rows is not None:
        total = sum(full)
        return [max(1, int(round(num_rows * n / total))) for n in full]
    fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else float(memory_fraction)
    return [sized_rows(n, fraction, width, dim) for n in full]


def remapped_spec(name: str, options_type: type, module_type: Callable[[SparseArchContext, Any], nn.Module],
                  description: str) -> SparseArchSpec:
    """The registry entry of a remapped method: build ``module_type(ctx, options)``, place every inner table
    row-wise, count memory byte for byte, and export it as data (:func:`embeddings.inference_state.default_hooks`:
    the module rebuilt by ``module_type(ctx, options)`` with the stored hot set); its sharder is registered by
    ``sharding/<method>.py``."""
    return SparseArchSpec(
        name=name,
        options_type=options_type,
        build=module_type,
        default_constraints=lambda module, options, topology: row_wise_constraints(module, topology),
        memory=lambda module, ctx, options, sparse_optimizer: remapped_memory(module, ctx, sparse_optimizer),
        ids="raw",
        description=description,
        inference=default_hooks(module_type),
    )


register_form("remapped", InferenceForm(RemappedEmbeddingBagCollection, "ebc", lambda layout: RemappedEmbeddingBagCollection(layout, device=torch.device("meta"))))
