"""Sharded MEM-REC's factored path (unweighted token lookup, alpha applied after the output dist, weight gradient
from the pooled outputs) against the unsharded module's weighted lookup, after several optimizer steps.

One-hot batches with empty bags, K = 1 or 2 and kw = 1, shared or per-feature tables, SUM or MEAN, SGD or Adagrad,
world size 2 (token tables row_wise) and 1 (table_wise); hot rows (a hot id is one lookup of its own row and
weight); a step where one rank's batch is multi-hot (every rank then takes the weighted path); weights of exactly 0
(their gradient needs the kept unweighted row).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.id_counts import FrequencyCounter, IdCounts
from embeddings.memrec import MemRecOptions, build, default_constraints
from embeddings.types import SparseArchContext, TopologyInfo
from tests.dist_utils import run_multiprocess
from tests.sharding.test_memrec_sharded import (
    BATCH,
    DIM,
    FEATURES,
    OPTIMIZERS,
    _assert_matches_reference,
    _copy_into_shards,
    _Model,
)
from sharding.sharders import sharders_for

STEPS = 4
MULTI_HOT_STEP = 2  # rank 1's batch of this step has a bag of two ids


def _one_hot_batch(step: int, rank: int, multi_hot: bool) -> Batch:
    gen = torch.Generator().manual_seed(100 * step + rank)
    lengths = torch.randint(0, 2, (len(FEATURES) * BATCH,), generator=gen)  # 0 or 1 id: empty bags included
    if multi_hot:
        lengths[1] = 2
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    values[::2] = torch.randint(0, 6, values[::2].shape, generator=gen)  # repeated ids -> shared rows
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
    return Batch(dense_features=torch.zeros(BATCH, 1), sparse_features=kjt, labels=labels)


def _counts() -> IdCounts:
    """Counts of the ids the steps train on: the repeated small ids become hot."""
    counter = FrequencyCounter(len(FEATURES))
    for step in range(STEPS):
        for rank in range(2):
            kjt = _one_hot_batch(step, rank, False).sparse_features
            for f, name in enumerate(FEATURES):
                counter.add(f, kjt[name].values().numpy())
    return counter.result(FEATURES)


def _build(options: MemRecOptions, hot: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    ctx = SparseArchContext(feature_names=FEATURES, num_embeddings_per_feature=[1000] * 3, embedding_dim=DIM,
                            device=torch.device("cpu"), pooling_factors=[0.5] * 3, id_counts=_counts() if hot else None)
    sparse = build(ctx, options)
    return _Model(sparse, [name for c in sparse.embedding_bag_configs() for name in c.feature_names])


def _shard(model: torch.nn.Module, options: MemRecOptions, optimizer: str, world: int) -> Any:
    cls, kwargs = OPTIMIZERS[optimizer]
    apply_optimizer_in_backward(cls, model.sparse.token_ebc.parameters(), dict(kwargs))
    module_sharders = sharders_for(model)
    constraints = default_constraints(model.sparse, options, TopologyInfo(world, world, "cpu"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu",
                                                         local_world_size=world), constraints=constraints)
    plan = planner.collective_plan(model, module_sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), plan=plan,
                                   sharders=module_sharders, device=torch.device("cpu"))
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optim = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense, lambda p: cls(p, **kwargs))])
    return dmp, optim


def _body(rank: int, world: int, option_args: Dict[str, Any], optimizer: str, zero_weight: bool) -> Dict[str, Any]:
    hot = "hot_share" in option_args
    sizes = {} if hot else {"num_token_rows": 30, "num_weight_rows": 7}
    options = MemRecOptions(seed=5, **sizes, **option_args)
    model = _build(options, hot)
    if hot:
        assert model.sparse.layout.hot.total >= 3
    if zero_weight:
        with torch.no_grad():
            model.sparse.weight_table[: model.sparse.weight_table.shape[0] // 2] = 0.0
    reference = copy.deepcopy(model)
    dmp, optim = _shard(model, options, optimizer, world)
    _copy_into_shards(dmp, reference)
    with torch.no_grad():
        dmp.module.sparse.weight_table.copy_(reference.sparse.weight_table)
    _assert_matches_reference(dmp, reference)
    cls, kwargs = OPTIMIZERS[optimizer]
    ref_optim = cls(reference.parameters(), **kwargs)
    factored: List[int] = []
    for step in range(STEPS):
        multi = step == MULTI_HOT_STEP
        optim.zero_grad()
        loss, logits = dmp(_one_hot_batch(step, rank, multi and rank == 1))
        loss.backward()
        optim.step()
        factored.append(dmp.module.sparse.factored_batches)
        ref_optim.zero_grad()
        ref_loss = torch.stack([reference(_one_hot_batch(step, r, multi and r == 1))[0] for r in range(world)]).mean()
        ref_loss.backward()
        ref_optim.step()
        _assert_matches_reference(dmp, reference)
    plan = {n: p.sharding_type for n, p in dmp.plan.plan["sparse"].items()}  # type: ignore[union-attr]
    # the switch that turns fbgemm's per-lookup weight gradient off found this rank's TBE kernels
    kernels = len(dmp.module.sparse._weight_grad_switch.kernels)
    return {"factored": factored, "plan": plan, "kernels": kernels}


CASES = [  # (options, optimizer, zero weights, factored count after each step)
    ({"num_token_hashes": 1, "num_weight_hashes": 1}, "sgd", False, [1, 2, 2, 3]),
    ({"num_token_hashes": 1, "num_weight_hashes": 1}, "adagrad", True, [1, 2, 2, 3]),
    ({"num_token_hashes": 2, "num_weight_hashes": 1, "shared_tables": False, "pooling": "mean"}, "sgd", False,
     [1, 2, 2, 3]),
    ({"num_token_hashes": 2, "num_weight_hashes": 1, "pooling": "mean"}, "adagrad", False, [1, 2, 2, 3]),
    ({"budget": 0.05, "hot_share": 0.4, "hot_min_count": 2}, "adagrad", True, [1, 2, 2, 3]),  # hot rows
    # kw = 2: an id's lookups carry two weight rows, so no batch factors (the weighted lookup stays)
    ({"num_token_hashes": 1, "num_weight_hashes": 2}, "sgd", False, [0, 0, 0, 0]),
]


def _cases_body(rank: int, world: int) -> List[Dict[str, Any]]:
    return [_body(rank, world, options, optimizer, zero) for options, optimizer, zero, _ in CASES]


def test_factored_path_matches_the_weighted_lookup_on_two_ranks() -> None:
    """Every step factors except the one where rank 1 has a multi-hot bag, on both ranks alike."""
    for rank_results in run_multiprocess(_cases_body, world_size=2):
        for (options, optimizer, _, expected), result in zip(CASES, rank_results):
            assert result["factored"] == expected, (options, optimizer, result["factored"])
            assert result["kernels"] >= 1
            assert all(t == "row_wise" for n, t in result["plan"].items() if n.startswith("memrec_tokens"))


def test_factored_path_on_one_rank_with_table_wise_tokens() -> None:
    (result,) = run_multiprocess(_body, world_size=1, args=({"num_token_hashes": 1}, "adagrad", True))
    assert result["factored"] == [1, 2, 3, 4]  # one rank: the multi-hot batch of rank 1 is absent
    assert result["plan"]["memrec_tokens"] == "table_wise" and result["kernels"] == 1
