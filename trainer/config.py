"""The run configuration: one dataclass per YAML section, loaded strictly from ``configs/*.yaml``.

A preset may start with ``base: other.yaml`` (relative to the preset) and then states only what differs.
Command-line overrides are ``section.key=value`` with ``value`` parsed as YAML
(``optimizer.sparse_lr=0.1``, ``sharding.tables={t_cat_0: {sharding_types: [row_wise]}}``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from trainer.data.data_config import DataConfig
from trainer.strict import ConfigError, from_dict, load_yaml, to_dict

ARCHS = ("dlrm", "dlrm_dcn")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise",
                  "table_column_wise")
COMPUTE_KERNELS = ("dense", "fused")
TABLE_SIZES = ("auto", "manifest", "counts")


@dataclass
class ModelConfig:
    """The dense part of the model (torchrec.models.dlrm)."""

    arch: str = "dlrm"  # "dlrm" (dot interaction) or "dlrm_dcn" (DCNv2 low-rank cross layers)
    embedding_dim: int = 16  # width of every pooled embedding (and of the bottom MLP output)
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [256, 64, 16])  # last = embedding_dim
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [256, 128, 1])  # last must be 1
    dcn_num_layers: int = 3  # DCNv2 cross layers (arch dlrm_dcn)
    dcn_low_rank_dim: int = 512  # rank of the low-rank cross layers (arch dlrm_dcn)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not self.dense_arch_layer_sizes or self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch_layer_sizes {self.dense_arch_layer_sizes} must end with embedding_dim "
                f"{self.embedding_dim} (the bottom MLP output meets the embeddings)"
            )
        if not self.over_arch_layer_sizes or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"over_arch_layer_sizes {self.over_arch_layer_sizes} must end with 1 (one logit)")
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            if any(s <= 0 for s in getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)} must be positive")
        if self.dcn_num_layers <= 0 or self.dcn_low_rank_dim <= 0:
            raise ValueError("dcn_num_layers and dcn_low_rank_dim must be positive")


@dataclass
class EmbeddingsConfig:
    """The sparse part: which registered method builds the embedding module, and its options."""

    kind: str = "full"  # a registered method: full, memrec, ... (see `compactrec train --help`)
    # sizes of the full (uncompressed) tables, the reference of every compression ratio; null = table_sizes
    num_embeddings_per_feature: Optional[List[int]] = None
    # where null sizes come from: "manifest" (the dataset's manifest.json), "counts" (distinct training values + 1
    # per feature, from `compactrec prepare`'s id counts) or "auto" (the manifest if it has sizes, else counts)
    table_sizes: str = "auto"
    options: Dict[str, Any] = field(default_factory=dict)  # checked by the method's options dataclass
    # modules to import before `kind` is looked up: methods from outside the package (each registers its spec in
    # embeddings.registry, its sharding module its sharder in sharding.registry); importable on every rank
    plugins: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.table_sizes not in TABLE_SIZES:
            raise ValueError(f"table_sizes must be one of {TABLE_SIZES}, got {self.table_sizes!r}")
        if self.num_embeddings_per_feature is not None and self.table_sizes != "auto":
            raise ValueError(f"num_embeddings_per_feature is given, so table_sizes={self.table_sizes!r} would be "
                             "ignored; set one of them")
        if self.num_embeddings_per_feature is not None:
            bad = [n for n in self.num_embeddings_per_feature if n <= 0]
            if bad:
                raise ValueError(f"num_embeddings_per_feature must be positive, got {bad[0]}")


@dataclass
class TableConstraint:
    """Planner constraint for one table (keyed by table name in ShardingConfig.tables)."""

    sharding_types: List[str] = field(default_factory=list)
    compute_kernels: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for st in self.sharding_types:
            if st not in SHARDING_TYPES:
                raise ValueError(f"sharding type {st!r} is not one of {SHARDING_TYPES}")
        for ck in self.compute_kernels:
            if ck not in COMPUTE_KERNELS:
                raise ValueError(f"compute kernel {ck!r} is not one of {COMPUTE_KERNELS}")


@dataclass
class ShardingConfig:
    """Planner settings. Per-table constraints override the method's default placement."""

    tables: Dict[str, TableConstraint] = field(default_factory=dict)  # table name -> {sharding_types, compute_kernels}
    # one constraint for every table the method does not place itself (e.g. [row_wise]); empty = planner's choice
    default_sharding_types: List[str] = field(default_factory=list)
    device_memory_gb: float = 80.0  # per-rank accelerator memory used when planning for cuda
    host_memory_gb: float = 64.0  # per-rank host memory used when planning for cpu
    reserved_memory_fraction: float = 0.15  # of each rank's memory kept for dense parts and activations
    # also offer data_parallel (replicated on every rank: no all-to-all, the dense gradient all-reduced) to the
    # tables the method places row-wise; the planner's cost model picks per table (`compactrec plan` shows both)
    offer_data_parallel: bool = False
    # GB/s of every collective between CPU ranks (gloo) in the planner's cost model; 0.6-2.4 measured for 2 ranks
    # here (benchmarks/gloo_bandwidth.py); TorchRec's defaults are GPU figures (600 GiB/s all-to-all)
    cpu_comms_gbps: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.offer_data_parallel, bool):
            raise TypeError(f"offer_data_parallel must be true or false, got {self.offer_data_parallel!r}")
        try:
            TableConstraint(sharding_types=self.default_sharding_types)
        except ValueError as exc:
            raise ValueError(f"default_sharding_types: {exc}") from exc
        if not 0.0 <= self.reserved_memory_fraction < 1.0:
            raise ValueError(f"reserved_memory_fraction must be in [0, 1), got {self.reserved_memory_fraction}")
        if isinstance(self.cpu_comms_gbps, bool) or not isinstance(self.cpu_comms_gbps, (int, float)) or \
                self.cpu_comms_gbps <= 0:
            raise ValueError(f"cpu_comms_gbps must be a positive number, got {self.cpu_comms_gbps!r}")
        if self.device_memory_gb <= 0 or self.host_memory_gb <= 0:
            raise ValueError("device_memory_gb and host_memory_gb must be positive")


@dataclass
class OptimizerConfig:
    """Fused sparse optimizer (inside fbgemm's TBE) and the dense optimizer for everything else."""

    sparse: str = "adagrad"  # sgd | adagrad | rowwise_adagrad
    sparse_lr: float = 0.05  # learning rate of the fused embedding-table optimizer
    dense: str = "adagrad"  # sgd | adagrad | adam
    dense_lr: float = 0.05  # learning rate of the MLPs and replicated tables
    eps: float = 1e-8  # Adagrad / Adam epsilon
    weight_decay: float = 0.0  # L2 weight decay for both optimizers
    # global batch the learning rates above were set for; when given, both rates are scaled linearly to the
    # run's global batch (MLPerf DLRMv2: lr 0.005 at 65536); null = use the rates as they are
    reference_global_batch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse must be one of {SPARSE_OPTIMIZERS}, got {self.sparse!r}")
        if self.dense not in DENSE_OPTIMIZERS:
            raise ValueError(f"dense must be one of {DENSE_OPTIMIZERS}, got {self.dense!r}")
        for name in ("sparse_lr", "dense_lr", "eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.reference_global_batch is not None and self.reference_global_batch <= 0:
            raise ValueError(f"reference_global_batch must be positive or null, got {self.reference_global_batch}")

    def scaled(self, global_batch: int) -> "OptimizerConfig":
        """A copy with both learning rates scaled linearly from ``reference_global_batch`` to ``global_batch``."""
        if self.reference_global_batch is None:
            return self
        factor = global_batch / self.reference_global_batch
        return dataclasses.replace(self, sparse_lr=self.sparse_lr * factor, dense_lr=self.dense_lr * factor,
                                   reference_global_batch=None)


RESUME_MODES = ("never", "latest", "auto")


@dataclass
class TrainingConfig:
    """The loop: length, evaluation schedule, logging, reproducibility."""

    epochs: int = 1  # passes over the training days
    max_steps: Optional[int] = None  # stop after this many steps (per rank) even inside an epoch
    evals_per_epoch: int = 2  # periodic validation passes per epoch (the final one always runs)
    seed: int = 0  # seeds Python, NumPy and torch on every rank (same dense init everywhere)
    run_dir: str = "runs/default"  # config.yaml, metrics.json and tensorboard/ land here
    log_every: int = 20  # steps between progress-bar / TensorBoard updates
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    final_test: bool = True  # evaluate the test split after training
    target_auc: Optional[float] = None  # stop at the first validation AUC >= this (MLPerf DLRMv2: 0.80275)
    mlperf_log: bool = True  # rank 0 writes MLPerf-style :::MLLOG events to RUN_DIR/mlperf.log
    progress_bar: bool = True  # rank-0 tqdm bar; false logs a line every log_every steps instead
    checkpoint_every: Optional[int] = None  # steps between sharded checkpoints in RUN_DIR/checkpoints (+ one at the end); null = none
    keep_checkpoints: int = 2  # newest complete checkpoints kept; older ones are deleted
    resume: str = "never"  # never (refuse a RUN_DIR holding checkpoints), latest (`--resume`: newest complete checkpoint, must exist) or auto (latest if any, else fresh; used by restarted jobs)
    on_nonfinite: str = "stop"  # NaN/inf loss: stop (error naming the batch) or skip (reload the newest checkpoint, replay without that batch; needs checkpoint_every)
    max_nonfinite_skips: int = 3  # with on_nonfinite=skip: stop at the next non-finite loss after this many skipped batches

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive or null, got {self.max_steps}")
        if self.evals_per_epoch < 0:
            raise ValueError(f"evals_per_epoch must be >= 0, got {self.evals_per_epoch}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be positive, got {self.log_every}")
        if self.target_auc is not None and not 0.5 < self.target_auc < 1.0:
            raise ValueError(f"target_auc must be in (0.5, 1) or null, got {self.target_auc}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive or null, got {self.checkpoint_every}")
        if self.keep_checkpoints <= 0:
            raise ValueError(f"keep_checkpoints must be positive, got {self.keep_checkpoints}")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume must be one of {list(RESUME_MODES)}, got {self.resume!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.on_nonfinite == "skip" and self.checkpoint_every is None:
            raise ValueError("on_nonfinite=skip rolls back to the newest checkpoint, so it needs checkpoint_every")
        if self.max_nonfinite_skips < 0:
            raise ValueError(f"max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")


@dataclass
class LaunchConfig:
    """How `compactrec train --nproc N` / torchx components launch the job."""

    scheduler: str = "local_cwd"  # torchx scheduler used by `compactrec train --nproc`
    nnodes: int = 1  # nodes of a launched job
    nproc_per_node: int = 2  # processes (GPUs) per node
    max_retries: int = 0  # scheduler restarts of a failed job (Kubernetes, Slurm, ...; local_cwd has none)
    max_restarts: int = 0  # torchrun restarts of the worker group when a rank dies (every scheduler, local_cwd too)
    rdzv_port: int = 29500  # c10d rendezvous port on the first node

    def __post_init__(self) -> None:
        if self.nnodes <= 0 or self.nproc_per_node <= 0:
            raise ValueError("nnodes and nproc_per_node must be positive")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")


@dataclass
class Config:
    """The whole run configuration (one section per dataclass)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        sizes = self.embeddings.num_embeddings_per_feature
        if self.data.num_embeddings_per_feature is None and sizes is not None:
            # multi-hot expansion reduces ids modulo the model's table sizes: one source of truth
            self.data.num_embeddings_per_feature = list(sizes)
        elif sizes is not None and list(self.data.num_embeddings_per_feature or []) != list(sizes):
            raise ValueError("data.num_embeddings_per_feature differs from embeddings.num_embeddings_per_feature; "
                             "set only embeddings.num_embeddings_per_feature")


def _deep_merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path, _seen: Sequence[Path] = (), files: Optional[List[Path]] = None) -> Dict[str, Any]:
    """Read a preset, resolving its ``base:`` chain (appended to ``files``, the preset first). Errors name
    the file; a key given twice and an empty file are errors (YAML would keep the last / give nothing)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: base chain loops back to itself")
    if files is not None:
        files.append(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, or an int of over 4300 digits
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise ConfigError(f"{path}: empty (no sections); a preset that changes nothing is `base: <preset>.yaml`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:  # `base:` left empty would drop the whole base silently
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    if not (path.parent / base).is_file():
        raise ConfigError(f"{path}: base {base!r}: config file {str(path.parent / base)!r} does not exist")
    parent = read_yaml(path.parent / base, (*_seen, resolved), files)
    return _deep_merge(parent, data)


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` with ``value`` parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {text!r}: key must be section.key (e.g. optimizer.sparse_lr=0.1)")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    node: Dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return node


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Load a preset (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    files: List[Path] = []
    data: Dict[str, Any] = read_yaml(Path(path), files=files) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if len(files) > 1:  # a key may come from any file of the chain
        source += " (base: " + " <- ".join(str(f) for f in files[1:]) + ")"
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    if overrides:
        source += " + overrides " + " ".join(overrides)
    config = from_dict(Config, data, source=source)
    check_embedding_options(config, source)
    return config


def check_embedding_options(config: Config, source: str) -> None:
    """Check ``embeddings.options`` against the chosen method's option type now, naming the config files,
    instead of when the model is built (possibly inside launched workers)."""
    from embeddings import registry

    try:
        registry.load_plugins(config.embeddings.plugins)
        spec = registry.get(config.embeddings.kind)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{source}: embeddings.kind: {exc.args[0] if exc.args else exc}") from None
    from_dict(spec.options_type, config.embeddings.options, source=source, prefix="embeddings.options")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved configuration (every field, defaults included) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


__all__ = [
    "Config", "ConfigError", "DataConfig", "EmbeddingsConfig", "LaunchConfig", "ModelConfig",
    "OptimizerConfig", "ShardingConfig", "TableConstraint", "TrainingConfig", "load_config",
    "parse_override", "read_yaml", "save_config",
]
