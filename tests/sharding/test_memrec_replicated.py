"""A MEM-REC token table planned data_parallel (replicated, dense kernel, the sparse optimizer run densely by the
trainer's ``combined_optimizer``) equals the row-wise one after several steps: 2 gloo ranks, SGD and Adagrad,
one-hot batches (factored path) and multi-hot batches (weighted lookup)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv

from embeddings.memrec import MemRecOptions, default_constraints
from embeddings.types import TopologyInfo
from tests.dist_utils import run_multiprocess
from tests.sharding.test_memrec_factored_sharded import _one_hot_batch
from tests.sharding.test_memrec_sharded import _batch, _build, _copy_into_shards, _local_shards
from trainer.config import OptimizerConfig
from trainer.train.optim import apply_sparse_optimizer, combined_optimizer
from sharding.sharders import sharders_for

STEPS = 3
OPTIMIZERS = {"sgd": OptimizerConfig(sparse="sgd", sparse_lr=0.5, dense="sgd", dense_lr=0.1),
              "adagrad": OptimizerConfig(sparse="adagrad", sparse_lr=0.1, dense="adagrad", dense_lr=0.05)}


def _shard(model: torch.nn.Module, options: MemRecOptions, cfg: OptimizerConfig, replicated: bool) -> Any:
    apply_sparse_optimizer(model.sparse, cfg)
    constraints = default_constraints(model.sparse, options, TopologyInfo(2, 2, "cpu"))
    if replicated:
        constraints["memrec_tokens"].sharding_types = ["data_parallel"]
        constraints["memrec_tokens"].compute_kernels = ["dense"]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu", local_world_size=2),
                                       constraints=constraints)
    plan = planner.collective_plan(model, sharders_for(model), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), plan=plan,
                                   sharders=sharders_for(model), device=torch.device("cpu"))
    return dmp, combined_optimizer(dmp, cfg)


def _compare(row_wise: DistributedModelParallel, replicated: DistributedModelParallel) -> None:
    full = replicated.state_dict()
    for name, tensor, (row, col) in _local_shards(row_wise):
        torch.testing.assert_close(tensor, full[name][row:row + tensor.shape[0], col:col + tensor.shape[1]],
                                   rtol=1e-5, atol=1e-6, msg=name)
    for name, value in row_wise.state_dict().items():
        if not hasattr(value, "local_shards"):
            torch.testing.assert_close(value, full[name], rtol=1e-5, atol=1e-6, msg=name)


def _run(rank: int, optimizer: str, batch: Callable[[int, int], Any], k: int) -> Dict[str, Any]:
    options = MemRecOptions(num_token_rows=30, num_weight_rows=7, num_token_hashes=k, seed=5)
    model, _ = _build(options, seed=0)
    reference = copy.deepcopy(model)
    cfg = OPTIMIZERS[optimizer]
    row_wise, row_optim = _shard(model, options, cfg, replicated=False)
    replicated, rep_optim = _shard(copy.deepcopy(reference), options, cfg, replicated=True)
    _copy_into_shards(row_wise, reference)
    with torch.no_grad():  # DMP re-initialises tables; both start from the reference
        replicated.module.sparse.token_ebc.embedding_bags["memrec_tokens"].weight.copy_(
            reference.sparse.token_ebc.embedding_bags["memrec_tokens"].weight)
        for dmp in (row_wise, replicated):
            dmp.module.sparse.weight_table.copy_(reference.sparse.weight_table)
    _compare(row_wise, replicated)
    for step in range(STEPS):
        for dmp, optim in ((row_wise, row_optim), (replicated, rep_optim)):
            optim.zero_grad()
            loss, _ = dmp(batch(step, rank))
            loss.backward()
            optim.step()
        _compare(row_wise, replicated)
    plans = [{n: p.sharding_type for n, p in d.plan.plan["sparse"].items()} for d in (row_wise, replicated)]
    moved = not torch.equal(replicated.module.sparse.token_ebc.embedding_bags["memrec_tokens"].weight,
                            reference.sparse.token_ebc.embedding_bags["memrec_tokens"].weight)
    return {"plans": plans, "factored": replicated.module.sparse.factored_batches, "moved": moved}


def _body(rank: int, world: int) -> List[Dict[str, Any]]:
    one_hot = lambda step, r: _one_hot_batch(step, r, multi_hot=False)  # noqa: E731
    return [_run(rank, "sgd", one_hot, 1), _run(rank, "adagrad", one_hot, 2), _run(rank, "adagrad", _batch, 2)]


def test_replicated_token_table_equals_the_row_wise_one_after_steps() -> None:
    for rank_results in run_multiprocess(_body, world_size=2):
        for result, factored in zip(rank_results, (STEPS, STEPS, 0)):
            row_plan, rep_plan = result["plans"]
            assert row_plan["memrec_tokens"] == "row_wise" and rep_plan["memrec_tokens"] == "data_parallel"
            assert result["factored"] == factored and result["moved"]
