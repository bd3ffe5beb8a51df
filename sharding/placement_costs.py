"""The planner's own cost estimates of every candidate placement of every table, for ``compactrec plan``.

The planner (``trainer.train.planning.make_planner``) enumerates candidate shardings of each table with an
``EmbeddingEnumerator`` and prices them with TorchRec's perf and storage estimators, then picks by estimated
time within memory. :func:`placement_costs` runs the same enumerator (same topology, batch size, constraints,
estimators) and reports each candidate: estimated ms per step of the slowest rank, split into forward/backward
compute and communication, the sum over ranks the proposers compare, and storage per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set

from torch import nn
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ModuleSharder, ShardingPlan


@dataclass
class PlacementCost:
    table: str
    sharding_type: str
    compute_kernel: str
    num_shards: int
    fwd_compute_ms: float  # of the slowest shard
    fwd_comms_ms: float
    bwd_compute_ms: float
    bwd_comms_ms: float
    slowest_rank_ms: float  # total estimate of the slowest shard
    sum_over_ranks_ms: float  # what the planner's proposers rank options by
    max_bytes_per_rank: int  # device (hbm) + host (ddr) storage of the largest shard
    chosen: bool


def _cost(option: ShardingOption, chosen: bool) -> PlacementCost:
    slowest = max(option.shards, key=lambda s: s.perf.total if s.perf is not None else 0.0)
    perf = slowest.perf
    storage = max((s.storage.hbm + s.storage.ddr) for s in option.shards if s.storage is not None) \
        if any(s.storage is not None for s in option.shards) else 0
    return PlacementCost(
        table=option.name, sharding_type=option.sharding_type, compute_kernel=option.compute_kernel,
        num_shards=len(option.shards),
        fwd_compute_ms=perf.fwd_compute if perf else 0.0, fwd_comms_ms=perf.fwd_comms if perf else 0.0,
        bwd_compute_ms=perf.bwd_compute if perf else 0.0, bwd_comms_ms=perf.bwd_comms if perf else 0.0,
        slowest_rank_ms=perf.total if perf else 0.0, sum_over_ranks_ms=option.total_perf,
        max_bytes_per_rank=int(storage), chosen=chosen)


def placement_costs(enumerator: EmbeddingEnumerator, model: nn.Module, sharders: List[ModuleSharder[nn.Module]],
                    plan: ShardingPlan) -> List[PlacementCost]:
    """Every candidate (sharding type, kernel) of every table, cheapest first per table, the plan's marked.

    Row-wise candidates differ only in how rows are split (the enumerator proposes one split per type), so one
    line per (table, sharding type, kernel) remains."""
    chosen: Dict[str, tuple] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            chosen[table] = (ps.sharding_type, ps.compute_kernel)
    seen: Set[tuple] = set()
    costs: List[PlacementCost] = []
    for option in enumerator.enumerate(model, sharders):
        key = (option.name, option.sharding_type, option.compute_kernel)
        if key in seen:
            continue
        seen.add(key)
        costs.append(_cost(option, chosen.get(option.name) == key[1:]))
    costs.sort(key=lambda c: (c.table, c.sum_over_ranks_ms))
    return costs


def format_costs(costs: List[PlacementCost], tables: Set[str]) -> str:
    """One line per candidate placement of ``tables``; ``*`` = planned."""
    shown = [c for c in costs if c.table in tables]
    if not shown:
        return ("estimated cost: no table was offered several sharding types (e.g. sharding.offer_data_parallel); "
                "`--costs all` lists every candidate")
    lines = ["estimated cost per candidate placement (TorchRec's estimators as the planner ran them; ms per step, "
             "slowest rank: fwd compute + fwd comms + bwd compute + bwd comms; * = planned)",
             f"  {'table':<28} {'sharding':<15} {'kernel':<6} {'fwd':>8} {'fwd comm':>9} {'bwd':>8} "
             f"{'bwd comm':>9} {'rank max':>9} {'all ranks':>10} {'MiB/rank':>9}"]
    for c in shown:
        lines.append(f"{'*' if c.chosen else ' '} {c.table:<28} {c.sharding_type:<15} {c.compute_kernel:<6} "
                     f"{c.fwd_compute_ms:>8.3f} {c.fwd_comms_ms:>9.3f} {c.bwd_compute_ms:>8.3f} "
                     f"{c.bwd_comms_ms:>9.3f} {c.slowest_rank_ms:>9.3f} {c.sum_over_ranks_ms:>10.3f} "
                     f"{c.max_bytes_per_rank / 2**20:>9.1f}")
    return "\n".join(lines)
