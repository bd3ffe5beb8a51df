"""MEM-REC under whatever placement a planner picks: its weight table is a replicated dense parameter, not a
table, so every sharding type of the token table is valid. User constraints still override the stock planner
(placement of every method), and each placement trains to the same state as the unsharded module."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embeddings.memrec import MemRecOptions
from tests.dist_utils import run_multiprocess
from tests.sharding.test_memrec_sharded import (
    OPTIMIZERS,
    WORLD,
    _assert_matches_reference,
    _batch,
    _build,
    _copy_into_shards,
    _reference_step,
)
from sharding.sharders import sharders_for

# row_wise, the default, is covered by test_memrec_sharded's parity tests
PLACEMENTS = [("table_wise", "fused"), ("column_wise", "fused"), ("data_parallel", "dense")]


def _placement_body(rank: int, world: int) -> Dict[str, Any]:
    """For each forced placement of the token table: sharded == unsharded after 3 SGD steps."""
    options = MemRecOptions(num_token_rows=30, num_weight_rows=7, num_token_hashes=2, num_weight_hashes=2,
                            pooling="mean", seed=5)
    cls, kwargs = OPTIMIZERS["sgd"]
    out: Dict[str, Any] = {}
    for sharding_type, kernel in PLACEMENTS:
        model, _ = _build(options, seed=0)
        reference = copy.deepcopy(model)
        apply_optimizer_in_backward(cls, model.sparse.token_ebc.parameters(), dict(kwargs))
        constraints = {"memrec_tokens": ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[kernel])}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders_for(model), dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), plan=plan,
                                       sharders=sharders_for(model), device=torch.device("cpu"))
        dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        optim = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense, lambda p: cls(p, **kwargs))])
        if sharding_type != "data_parallel":
            _copy_into_shards(dmp, reference)
        else:  # a replicated token table is a plain tensor of the state dict
            dmp.load_state_dict(reference.state_dict(), strict=False)
        ref_optim = cls(reference.parameters(), **kwargs)
        for step in range(3):
            optim.zero_grad()
            loss, logits = dmp(_batch(step, rank))
            loss.backward()
            optim.step()
            _reference_step(reference, ref_optim, step)
            ref_optim.step()
        _assert_matches_reference(dmp, reference)
        placed = dmp.plan.plan["sparse"]  # type: ignore[index]
        moved = float((reference.sparse.weight_table - _build(options, seed=0)[0].sparse.weight_table).abs().max())
        out[sharding_type] = {"plan": {n: (p.sharding_type, p.compute_kernel) for n, p in placed.items()},
                              "weights_moved": moved}
    return out


def test_every_token_table_placement_trains_like_the_unsharded_module() -> None:
    for result in run_multiprocess(_placement_body, world_size=WORLD):
        for sharding_type, kernel in PLACEMENTS:
            r = result[sharding_type]
            assert r["plan"] == {"memrec_tokens": (sharding_type, kernel)}  # the constraint won
            assert r["weights_moved"] > 1e-4  # the replicated weight table learned: the parity is not vacuous


def _planned(kind_options: Dict[str, Any], constraints: Dict[str, ParameterConstraints]) -> Dict[str, List[str]]:
    from tests.sharding.test_baselines_sharded import build_model

    kind, options = kind_options["kind"], kind_options["options"]
    model, opts = build_model(kind, options, seed=0, device="meta")
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=constraints)
    plan = planner.plan(model, sharders_for(model)).plan["sparse"]
    return {name: [p.sharding_type, p.compute_kernel] for name, p in plan.items()}  # type: ignore[union-attr]


@pytest.mark.parametrize("kind,options,table", [
    ("hash", {"num_rows": 16}, "hash_f1"),
    ("robe", {"num_rows": 32, "chunk_size": 4}, "robe_memory"),
    ("qr", {"num_collisions": 4}, "qr_remainder"),
])
def test_constraints_override_the_stock_planner(kind: str, options: Dict[str, Any], table: str) -> None:
    free = _planned({"kind": kind, "options": options}, {})
    forced = _planned({"kind": kind, "options": options},
                      {table: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])})
    assert set(free) == set(forced)
    assert forced[table] == ["table_wise", "fused"]
