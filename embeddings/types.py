"""Value types shared by every sparse-arch (embedding) method.

A method (``full``, ``memrec``, ``lma``, ...) is registered once as a :class:`SparseArchSpec`; the trainer
only talks to that spec. Adding a method therefore never changes the trainer: it registers a module
builder, its options dataclass and its default placement; its sharders are registered by module type on the
sharded side (``sharding.registry``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

if TYPE_CHECKING:
    from embeddings.hot_rows import HotSet
    from embeddings.id_counts import IdCounts


@dataclass(frozen=True)
class SparseArchContext:
    """What the trainer knows about the sparse features when it builds the embedding module.

    ``num_embeddings_per_feature`` are the sizes of the *full* (uncompressed) tables of the model: the
    reference every compression ratio is computed against; None when unknown (raw hashed ids and a method
    sized in rows need none: :meth:`table_sizes` names what needs them). ``pooling_factors`` is the mean number of ids
    per sample and feature (1.0 for one-hot data). ``id_counts`` are the training data's id frequencies
    (``compactrec prepare``), for methods with hot rows or a vocabulary; None when the config needs none.
    ``hot``: the hot set itself (an inference artifact's, ``embeddings.inference_state``); when given, methods take
    it instead of selecting one from ``id_counts``.
    """

    feature_names: Sequence[str]
    num_embeddings_per_feature: Optional[Sequence[int]]
    embedding_dim: int
    device: torch.device
    pooling_factors: Optional[Sequence[float]] = None
    id_counts: Optional["IdCounts"] = field(default=None, compare=False, repr=False)
    hot: Optional["HotSet"] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        sizes = self.num_embeddings_per_feature
        if sizes is not None and len(self.feature_names) != len(sizes):
            raise ValueError(f"{len(self.feature_names)} feature names but {len(sizes)} table sizes")
        for name, rows in zip(self.feature_names, sizes or []):
            if rows <= 0:
                raise ValueError(f"table size of feature {name!r} must be positive, got {rows}")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.pooling_factors is not None and len(self.pooling_factors) != len(self.feature_names):
            raise ValueError("pooling_factors must have one entry per feature")

    @property
    def has_table_sizes(self) -> bool:
        return self.num_embeddings_per_feature is not None

    def table_sizes(self, needed_by: str) -> List[int]:
        """The full tables' sizes; a clear error naming ``needed_by`` when they are unknown."""
        if self.num_embeddings_per_feature is None:
            raise ValueError(
                f"{needed_by} needs the full tables' sizes, which are unknown: set embeddings.num_embeddings_per_feature, "
                "or take them from the data (embeddings.table_sizes: counts, then `compactrec prepare CONFIG`), or "
                "size the method in rows (e.g. embeddings.options.num_rows / num_token_rows)")
        return [int(n) for n in self.num_embeddings_per_feature]

    def pooling_factor(self, index: int) -> float:
        return 1.0 if self.pooling_factors is None else float(self.pooling_factors[index])

    def all_pooling_factors(self) -> List[float]:
        """Mean ids per sample of every feature, in feature order (1.0 where unknown)."""
        return [self.pooling_factor(i) for i in range(len(self.feature_names))]


@dataclass(frozen=True)
class TopologyInfo:
    """The cluster shape placement defaults depend on (e.g. table_row_wise only with several nodes)."""

    world_size: int
    local_world_size: int
    compute_device: str  # "cpu" or "cuda"

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def row_sharding_type(self) -> str:
        """Sharding type of a table the plan splits by rows: ``table_row_wise`` across nodes (row shards stay
        inside a node), ``row_wise`` on one node, and ``table_wise`` on a single rank, where the one shard is the
        whole table and row-wise would only add its input bucketization and output reduce-scatter."""
        if self.world_size == 1:
            return "table_wise"
        return "table_row_wise" if self.num_nodes > 1 else "row_wise"


@dataclass(frozen=True)
class TableMemory:
    """Exact bytes of one table/buffer kept by a method (optimizer state reported separately)."""

    name: str
    rows: int
    cols: int
    bytes: int
    kind: str  # "parameter" or "buffer"


@dataclass
class MemoryReport:
    """Bytes kept by a sparse arch, and the ratio against the full tables of the same model."""

    tables: List[TableMemory]
    optimizer_state_bytes: int
    full_table_bytes: Optional[int]  # None when the full tables' sizes are unknown

    @property
    def parameter_bytes(self) -> int:
        return sum(t.bytes for t in self.tables if t.kind == "parameter")

    @property
    def buffer_bytes(self) -> int:
        return sum(t.bytes for t in self.tables if t.kind == "buffer")

    @property
    def total_bytes(self) -> int:
        """Everything needed at inference: parameters and buffers (dictionaries, hash seeds...)."""
        return self.parameter_bytes + self.buffer_bytes

    @property
    def compression_ratio(self) -> Optional[float]:
        """Full tables' bytes / bytes kept; None when the full tables' sizes are unknown."""
        return None if self.full_table_bytes is None else self.full_table_bytes / max(1, self.total_bytes)

    def versus_full(self) -> str:
        """"vs full tables X: Nx smaller", or that the full tables' sizes are unknown."""
        if self.full_table_bytes is None or self.compression_ratio is None:
            return "full tables' sizes unknown (no compression ratio)"
        return f"vs full tables {self.full_table_bytes:,} B: {self.compression_ratio:,.1f}x smaller"

    def as_dict(self) -> Dict[str, Any]:
        return {
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "parameter_bytes": self.parameter_bytes,
            "buffer_bytes": self.buffer_bytes,
            "total_bytes": self.total_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "full_table_bytes": self.full_table_bytes,
            "compression_ratio": self.compression_ratio,
        }


@dataclass(frozen=True)
class TrainingData:
    """The training split as a method's artifact hooks see it; the trainer supplies it from its config
    (``trainer.prepare.run.training_data``), so a method builds its artifact without knowing file formats.

    - ``feature_names`` / ``embedding_dim``: the model's sparse features and embedding width.
    - ``fingerprint()``: what the data is (files, sizes, mtimes, days) - recorded in an artifact's header and
      compared by :mod:`embeddings.provenance`.
    - ``num_rows()``: rows of the split; ``batches()``: KJTs of raw ids of every row in data order (any cut).
    """

    feature_names: Sequence[str]
    embedding_dim: int
    fingerprint: Callable[[], Dict[str, Any]]
    num_rows: Callable[[], int]
    batches: Callable[[], Iterable[KeyedJaggedTensor]]
    where: str = "the training split"


@dataclass(frozen=True)
class ArtifactHooks:
    """A method that needs a file built from the training data (LMA's minhash index), as the trainer sees it:
    ``compactrec prepare`` builds it, training and the pre-launch check check it, checkpoints record it.

    - ``name``: what it is, in messages ("LMA index"); ``path_option``: the option that names its file.
    - ``path(options)``: the configured file, or None when the options name none.
    - ``build(options, data, out)``: build it from ``data`` into ``out``; returns a summary line.
    - ``differences(options, data)``: None when the file is missing, else the fields where it differs from the
      options and the data ([] = current; an unreadable file is one difference).
    - ``check(options, data, rebuild_command)``: raise naming ``rebuild_command`` unless it is current.
    """

    name: str
    path_option: str  # the option naming the file, e.g. "embeddings.options.index_path"
    path: Callable[[Any], Optional[str]]
    build: Callable[[Any, TrainingData, str], str]
    differences: Callable[[Any, TrainingData], Optional[List[str]]]
    check: Callable[[Any, TrainingData, str], None]


@dataclass(frozen=True)
class InferenceHooks:
    """How an inference artifact (``trainer.serve``) holds a method's module as data only, no code: the module is
    rebuilt at load by the installed package from the config, and its tables, buffers and parameters are loaded
    into it as tensors.

    - ``state(module)``: what the module was built from beyond the config and the table sizes, as tensors (the
      hot values of each feature, the LMA dictionary's size; ``embeddings.inference_state``); its buffers and
      parameters are stored anyway.
    - ``rebuild(ctx, options, state)``: the module again on ``ctx.device`` (``meta``) from the config's options
      and ``state`` alone - no id counts, no index file, no training data.
    """

    state: Callable[[nn.Module], Dict[str, torch.Tensor]]
    rebuild: Callable[[SparseArchContext, Any, Dict[str, torch.Tensor]], nn.Module]


BuildFn = Callable[[SparseArchContext, Any], nn.Module]
ConstraintsFn = Callable[[nn.Module, Any, TopologyInfo], Dict[str, ParameterConstraints]]
MemoryFn = Callable[[nn.Module, SparseArchContext, Any, str], MemoryReport]
# returns a model class taking (embedding_bag_collection, dense_in_features, dense_arch_layer_sizes,
# over_arch_layer_sizes, dense_device) when the method needs its own head, else None (DLRM / DLRM-DCN)
DenseHeadFn = Callable[[Any], Optional[Callable[..., nn.Module]]]


@dataclass(frozen=True)
class SparseArchSpec:
    """One registered embedding method.

    - ``options_type``: dataclass filled strictly from the ``embeddings.options`` section of the config.
    - ``build(ctx, options)``: returns a module with TorchRec's EmbeddingBagCollection interface
      (KJT in, KeyedTensor out, ``embedding_bag_configs()``, ``is_weighted()``); built on ``ctx.device``
      which may be ``meta`` (planning) - the module must then not touch data.
    - ``default_constraints(module, options, topology)``: planner constraints keyed by the names that
      the sharders' ``shardable_parameters()`` return; config overrides are applied on top.
    - ``memory(module, ctx, options, sparse_optimizer)``: exact bytes kept, see :class:`MemoryReport`.
    - ``dense_head(options)``: a model class replacing DLRM's interaction for this method (e.g. MEM-REC's
      per-sample variant concatenates one vector per sample), or None.
    - ``artifact``: :class:`ArtifactHooks` when the method needs a file built from the data, else None.
    - ``inference``: :class:`InferenceHooks`, how ``compactrec export`` stores the module and ``load`` rebuilds
      it (``embeddings.inference_state.default_hooks`` for a method built from the config and a hot set); None:
      the method cannot be exported.
    - ``ids``: "raw" if the module accepts any int64 id (compressed methods hash them), or "table" if
      ids must be reduced into ``[0, num_embeddings)`` first (the data path does ``id mod rows``);
      ``ids_for(options)``, when given, decides per options instead (:meth:`id_mode`).
    """

    name: str
    options_type: type
    build: BuildFn
    default_constraints: ConstraintsFn
    memory: MemoryFn
    ids: str = "raw"
    description: str = ""
    dense_head: Optional[DenseHeadFn] = None
    ids_for: Optional[Callable[[Any], str]] = None
    artifact: Optional[ArtifactHooks] = None
    inference: Optional[InferenceHooks] = None

    def __post_init__(self) -> None:
        if self.ids not in ("raw", "table"):
            raise ValueError(f"SparseArchSpec {self.name!r}: ids must be 'raw' or 'table', got {self.ids!r}")

    def id_mode(self, options: Any) -> str:
        """"raw" or "table" for a module built with ``options`` (see ``ids``)."""
        return self.ids_for(options) if self.ids_for is not None else self.ids

    @staticmethod
    def needs_table_sizes(options: Any) -> bool:
        """Whether a module built with ``options`` needs the full tables' sizes (True unless the options say)."""
        return bool(getattr(options, "needs_table_sizes", True))

    @staticmethod
    def needs_id_counts(options: Any) -> bool:
        """Whether a module built with ``options`` needs the training data's id counts in its context."""
        return bool(getattr(options, "needs_id_counts", False))


def optimizer_state_bytes(rows: int, cols: int, optimizer: str) -> int:
    """Bytes of fused optimizer state for one fp32 table of ``rows x cols`` under ``optimizer``."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adagrad":
        return rows * cols * 4
    if optimizer == "rowwise_adagrad":
        return rows * 4
    raise ValueError(f"unknown sparse optimizer {optimizer!r}")


def table_memory(name: str, tensor: torch.Tensor, kind: str) -> TableMemory:
    """Exact bytes of a parameter/buffer (works on ``meta`` tensors: uses shape and dtype only)."""
    rows = int(tensor.shape[0]) if tensor.dim() > 0 else 1
    cols = int(tensor.numel() // max(1, rows))
    return TableMemory(name, rows, cols, int(tensor.numel() * tensor.element_size()), kind)


def full_table_bytes(ctx: SparseArchContext) -> Optional[int]:
    """fp32 bytes of the uncompressed tables of the model (the compression reference); None when unknown."""
    if ctx.num_embeddings_per_feature is None:
        return None
    return sum(int(n) for n in ctx.num_embeddings_per_feature) * ctx.embedding_dim * 4

