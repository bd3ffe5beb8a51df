"""``compactrec plan``: build the model on ``meta``, plan it for a topology with no process group,
print placement and memory per rank. Works for clusters far larger than this machine."""

from __future__ import annotations

from typing import List, Set

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder

from embeddings.types import TopologyInfo
from trainer.config import Config
from trainer.prepare.dataset_info import dataset_info
from trainer.train.model import SparseArch, TrainModel, build_dlrm, build_sparse_arch, memory_report, sparse_context
from trainer.train.optim import apply_sparse_optimizer
from sharding.placement_costs import format_costs, placement_costs
from trainer.train.planning import constraints, format_plan, make_enumerator, placements, plan_model
from sharding.sharders import sharders_for


def run_plan(config: Config, world_size: int, local_world_size: int, device: str, costs: str = "offered") -> str:
    """The plan, memory per rank and the estimated cost of the candidate placements: of the tables whose
    constraints offer several sharding types (``costs="offered"``, e.g. with ``sharding.offer_data_parallel``), of
    every table (``"all"``), or none (``"none"``)."""
    if world_size < 1 or local_world_size < 1 or world_size % local_world_size:
        raise ValueError(f"--world-size {world_size} must be a positive multiple of --local-world-size {local_world_size}")
    info = dataset_info(config, require_data=False)
    meta = torch.device("meta")
    arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                    meta, info.pooling_factors, info.id_counts))
    model = TrainModel(build_dlrm(config, arch, dense_device=meta))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = sharders_for(arch.module)
    topo = TopologyInfo(world_size, local_world_size, device)
    enumerator = make_enumerator(config, arch, sharders, topo)
    plan = plan_model(config, model, arch, sharders, topo, enumerator=enumerator)
    rows = placements(plan, model, sharders, world_size)
    mem = memory_report(arch, config.optimizer.sparse)
    nodes = world_size // local_world_size
    header = (f"plan for {nodes} node(s) x {local_world_size} {device} rank(s) (world size {world_size}), "
              f"embeddings.kind={config.embeddings.kind}, {config.model.arch}")
    memline = (f"embedding memory {mem.total_bytes:,} B {mem.versus_full()} (optimizer state "
               f"{mem.optimizer_state_bytes:,} B)")
    parts = [header, format_plan(rows, world_size), memline]
    if costs != "none":
        candidates = placement_costs(enumerator, model, sharders, plan)
        parts.append(format_costs(candidates, {c.table for c in candidates} if costs == "all"
                                  else offered_tables(config, arch, sharders, topo)))
    return "\n".join(parts)


def offered_tables(config: Config, arch: SparseArch, sharders: List[ModuleSharder[nn.Module]],
                   topo: TopologyInfo) -> Set[str]:
    """Tables whose constraints offer the planner several sharding types (e.g. ``sharding.offer_data_parallel``)."""
    return {name for name, c in constraints(arch, sharders, config.sharding, topo).items()
            if c.sharding_types and len(c.sharding_types) > 1}
