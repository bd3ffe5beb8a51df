"""Planner integration: topology, constraints (method defaults + config overrides), per-rank memory.

Planning needs no process group: ``plan_model`` works for any topology from a ``meta``-device model,
which is how ``compactrec plan`` sizes clusters far larger than this machine.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from embeddings.types import TopologyInfo
from trainer.config import Config, ShardingConfig
from trainer.train.model import SparseArch
from sharding.plan_estimators import FusedReplicaEstimator, HostCommsBandwidths, InlineInputDistEstimator

logger = logging.getLogger(__name__)
GIB = 1024**3
# sharding type shown for a planned module's dense parameters that are no table (DDP replicates them)
REPLICATED = "replicated"


def topology(info: TopologyInfo, sharding: ShardingConfig) -> Topology:
    """TorchRec topology: on cuda the per-rank HBM is the budget, on cpu the host memory and gloo's bandwidth."""
    trainer = TrainerConfig(
        world_size=info.world_size,
        local_world_size=info.local_world_size,
        hbm_cap_bytes=int(sharding.device_memory_gb * GIB) if info.compute_device == "cuda" else None,
        ddr_cap_bytes=int(sharding.host_memory_gb * GIB),
    )
    comms = None
    if info.compute_device == "cpu":  # gloo: every collective at the same, measured, bandwidth
        comms = HostCommsBandwidths(sharding.cpu_comms_gbps, sharding.cpu_comms_gbps)
    kernel = KernelConfig(compute_device=info.compute_device, generalized_comms_bandwidths=comms)
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=kernel)


def shardable_table_names(module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[str]:
    """Names the planner keys constraints by (``shardable_parameters()`` of every shardable module)."""
    names: List[str] = []
    for sub in module.modules():
        for sharder in sharders:
            if type(sub) is sharder.module_type:
                names.extend(sharder.shardable_parameters(sub).keys())
                break
    return names


def constraints(arch: SparseArch, sharders: List[ModuleSharder[nn.Module]], sharding: ShardingConfig,
                info: TopologyInfo) -> Dict[str, ParameterConstraints]:
    """Method defaults, then ``sharding.default_sharding_types``, then per-table config overrides."""
    names = shardable_table_names(arch.module, sharders)
    result = dict(arch.spec.default_constraints(arch.module, arch.options, info))
    if sharding.offer_data_parallel:
        result = {name: with_data_parallel(c) for name, c in result.items()}
    pooling = _table_pooling_factors(arch)
    for name in names:
        if name in result:
            continue
        # tables the method leaves to the planner: their true pooling factors (multi-hot data), and the
        # configured default sharding types if any
        result[name] = ParameterConstraints(sharding_types=list(sharding.default_sharding_types) or None,
                                            pooling_factors=[pooling.get(name, 1.0)])
    for name, override in sharding.tables.items():
        if name not in names:
            raise ValueError(f"sharding.tables: unknown table {name!r}; tables of this model: {', '.join(names)}")
        base = result.get(name, ParameterConstraints())
        updates = {}
        if override.sharding_types:
            updates["sharding_types"] = list(override.sharding_types)
        if override.compute_kernels:
            updates["compute_kernels"] = list(override.compute_kernels)
        result[name] = dataclasses.replace(base, **updates)
    return result


ROW_PLACEMENTS = {ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value, ShardingType.TABLE_WISE.value}


def with_data_parallel(constraint: ParameterConstraints) -> ParameterConstraints:
    """``constraint`` of a table the method places row-wise (fused kernel) with data_parallel (dense kernel) offered
    too, so that the planner's cost model chooses between them; other constraints unchanged."""
    types = list(constraint.sharding_types or [])
    kernels = list(constraint.compute_kernels or [])
    if not types or not set(types) <= ROW_PLACEMENTS or kernels != [EmbeddingComputeKernel.FUSED.value]:
        return constraint
    return dataclasses.replace(constraint, sharding_types=types + [ShardingType.DATA_PARALLEL.value],
                               compute_kernels=kernels + [EmbeddingComputeKernel.DENSE.value])


def _table_pooling_factors(arch: SparseArch) -> Dict[str, float]:
    """Mean ids per sample of each table the module reports, summed over the dataset features it serves."""
    index = {f: i for i, f in enumerate(arch.context.feature_names)}
    configs: List[Any] = getattr(arch.module, "embedding_bag_configs", lambda: [])()
    return {c.name: sum(arch.context.pooling_factor(index[f]) for f in c.feature_names if f in index) or 1.0
            for c in configs}


def make_enumerator(config: Config, arch: SparseArch, sharders: List[ModuleSharder[nn.Module]],
                    info: TopologyInfo) -> EmbeddingEnumerator:
    """Candidate placements of every table, priced by TorchRec's perf and storage estimators plus
    :class:`sharding.plan_estimators.InlineInputDistEstimator` and ``FusedReplicaEstimator`` (the planner's cost
    model; ``sharding.placement_costs`` prints what it estimates)."""
    topo = topology(info, config.sharding)
    cons = constraints(arch, sharders, config.sharding, info)
    estimators = [EmbeddingPerfEstimator(topology=topo, constraints=cons),
                  InlineInputDistEstimator(topology=topo, constraints=cons),
                  FusedReplicaEstimator(topology=topo, constraints=cons),
                  EmbeddingStorageEstimator(topology=topo, constraints=cons)]
    return EmbeddingEnumerator(topology=topo, batch_size=config.data.batch_size, constraints=cons,
                               estimator=estimators)


def make_planner(config: Config, arch: SparseArch, sharders: List[ModuleSharder[nn.Module]],
                 info: TopologyInfo, enumerator: Optional[EmbeddingEnumerator] = None) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=topology(info, config.sharding),
        batch_size=config.data.batch_size,
        enumerator=enumerator or make_enumerator(config, arch, sharders, info),
        # reserve a fixed share of each rank's memory for dense parameters, activations and buffers
        storage_reservation=FixedPercentageStorageReservation(config.sharding.reserved_memory_fraction),
        debug=True,
    )


def plan_model(config: Config, model: nn.Module, arch: SparseArch, sharders: List[ModuleSharder[nn.Module]],
               info: TopologyInfo, pg: Optional[dist.ProcessGroup] = None,
               enumerator: Optional[EmbeddingEnumerator] = None) -> ShardingPlan:
    """Plan ``model``; with a process group every rank agrees on rank 0's plan."""
    planner = make_planner(config, arch, sharders, info, enumerator)
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


@dataclass
class PlacedTable:
    module: str
    table: str
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    bytes_per_rank: Dict[int, int]


def placements(plan: ShardingPlan, model: nn.Module, sharders: List[ModuleSharder[nn.Module]],
               world_size: int) -> List[PlacedTable]:
    """Per-table placement and exact parameter bytes per rank, read from the plan's shard specs.

    Replicated (data_parallel) tables count in full on every rank; sizes come from the sharders'
    ``shardable_parameters()``, i.e. the same tensors the planner saw. A planned module's parameters that are
    no table (MEM-REC's weight table: replicated, all-reduced by DDP, never planned) follow as rows of
    sharding ``replicated`` and kernel ``ddp``, in full on every rank.
    """
    rows: List[PlacedTable] = []
    for module_path, module_plan in plan.plan.items():
        module = model.get_submodule(module_path) if module_path else model
        tables = _shardable(module, sharders)
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            per_rank: Dict[int, int] = {}
            spec = ps.sharding_spec
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value or spec is None:
                param = tables[table]
                size = int(param.numel() * param.element_size())
                for r in ps.ranks or range(world_size):
                    per_rank[r] = per_rank.get(r, 0) + size
            else:
                for shard in spec.shards:  # type: ignore[union-attr]
                    rank = shard.placement.rank()  # type: ignore[union-attr]
                    n = 1
                    for s in shard.shard_sizes:
                        n *= int(s)
                    per_rank[rank] = per_rank.get(rank, 0) + tables[table].element_size() * n
            rows.append(PlacedTable(module_path, table, ps.sharding_type, ps.compute_kernel,
                                    sorted(per_rank), per_rank))
        planned = {id(p) for p in tables.values()}
        for name, param in module.named_parameters():
            if id(param) not in planned:
                size = int(param.numel() * param.element_size())
                rows.append(PlacedTable(module_path, name, REPLICATED, "ddp", list(range(world_size)),
                                        {r: size for r in range(world_size)}))
    return rows


def _shardable(module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> Dict[str, nn.Parameter]:
    for sharder in sharders:
        if type(module) is sharder.module_type:
            return dict(sharder.shardable_parameters(module))
    raise ValueError(f"no sharder for planned module of type {type(module).__name__}")


def memory_per_rank(rows: List[PlacedTable], world_size: int) -> List[int]:
    totals = [0] * world_size
    for row in rows:
        for rank, b in row.bytes_per_rank.items():
            totals[rank] += b
    return totals


def format_plan(rows: List[PlacedTable], world_size: int) -> str:
    lines = [f"{'table':<32} {'sharding':<16} {'kernel':<8} {'ranks':<18} {'MiB/rank(max)':>14}"]
    for r in rows:
        ranks = _ranks_str(r.ranks)
        lines.append(f"{r.table:<32} {r.sharding_type:<16} {r.compute_kernel:<8} {ranks:<18} "
                     f"{max(r.bytes_per_rank.values(), default=0) / 2**20:>14.3f}")
    totals = memory_per_rank(rows, world_size)
    lines.append("embedding parameter memory per rank (MiB): " + " ".join(f"{t / 2**20:.2f}" for t in totals[:16])
                 + (" ..." if world_size > 16 else ""))
    lines.append(f"max {max(totals) / GIB:.4f} GiB, min {min(totals) / GIB:.4f} GiB, total {sum(totals) / GIB:.4f} GiB "
                 "(parameters; fused optimizer state comes on top: x2 for adagrad, ~0 for sgd/rowwise_adagrad)")
    return "\n".join(lines)


def _ranks_str(ranks: List[int]) -> str:
    if not ranks:
        return "-"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}..{ranks[-1]}"
    return ",".join(map(str, ranks))
