"""Sharded MEM-REC on 2 gloo ranks against the single-process module, from the same initial state.

Token tables row_wise (fused TBE, optimizer applied in backward), placed by the planner through the method's
default constraints; the weight table is a replicated dense parameter (DDP, dense optimizer) the planner
never sees. Sharded gradients
are averaged over ranks, so the reference minimises the mean of the per-rank losses on the union of
the ranks' batches.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.memrec import MemRecOptions, build, default_constraints
from embeddings.types import SparseArchContext, TopologyInfo
from sharding.memrec import MemRecEmbeddingBagCollectionSharder, _check_plan
from tests.dist_utils import run_multiprocess
from sharding.sharders import sharders_for

FEATURES = ["f0", "f1", "f2"]
DIM = 4
BATCH = 4
STEPS = 3
WORLD = 2
OPTIMIZERS: Dict[str, Tuple[type, Dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
}


class _Model(nn.Module):
    """Sparse arch + linear head; ``forward(batch) -> (loss, logits)`` as TrainPipelineSparseDist wants."""

    def __init__(self, sparse: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.sparse = sparse
        self.keys = keys
        self.head = nn.Linear(DIM * len(keys), 1)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.sparse(batch.sparse_features).to_dict()
        logits = self.head(torch.cat([pooled[k] for k in self.keys], dim=1)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def _batch(step: int, rank: int) -> Batch:
    """Multi-hot bags (empty ones too) of raw ids: negative, small, above 2**32."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 4, (len(FEATURES) * BATCH,), generator=gen)
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    values[::3] = torch.randint(0, 20, values[::3].shape, generator=gen)  # repeated ids -> shared rows
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
    return Batch(dense_features=torch.zeros(BATCH, 1), sparse_features=kjt, labels=labels)


def _build(options: MemRecOptions, seed: int) -> Tuple[nn.Module, List[str]]:
    torch.manual_seed(seed)
    ctx = SparseArchContext(feature_names=FEATURES, num_embeddings_per_feature=[1000] * 3, embedding_dim=DIM,
                            device=torch.device("cpu"), pooling_factors=[1.5] * 3)
    sparse = build(ctx, options)
    keys = [name for c in sparse.embedding_bag_configs() for name in c.feature_names]
    return _Model(sparse, keys), keys


def _shard(model: nn.Module, options: MemRecOptions, optimizer: str) -> Tuple[DistributedModelParallel, Any]:
    cls, kwargs = OPTIMIZERS[optimizer]
    # before planning; a copy, since sharding writes an "optimizer" key into these kwargs
    apply_optimizer_in_backward(cls, model.sparse.token_ebc.parameters(), dict(kwargs))
    module_sharders = sharders_for(model)
    constraints = default_constraints(model.sparse, options, TopologyInfo(WORLD, WORLD, "cpu"))
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD), constraints=constraints
    )
    plan = planner.collective_plan(model, module_sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), plan=plan,
                                   sharders=module_sharders, device=torch.device("cpu"))
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optim = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense, lambda p: cls(p, **kwargs))])
    return dmp, optim


def _local_shards(dmp: DistributedModelParallel) -> Iterator[Tuple[str, torch.Tensor, List[int]]]:
    for name, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                yield name, shard.tensor, list(shard.metadata.shard_offsets)


def _copy_into_shards(dmp: DistributedModelParallel, reference: nn.Module) -> None:
    """DMP re-initialises sharded tables: load the reference's rows into this rank's shards."""
    full = reference.state_dict()
    with torch.no_grad():
        for name, tensor, (row, col) in _local_shards(dmp):
            tensor.copy_(full[name][row:row + tensor.shape[0], col:col + tensor.shape[1]])


def _assert_matches_reference(dmp: DistributedModelParallel, reference: nn.Module) -> None:
    full = reference.state_dict()
    for name, tensor, (row, col) in _local_shards(dmp):
        torch.testing.assert_close(tensor, full[name][row:row + tensor.shape[0], col:col + tensor.shape[1]],
                                   rtol=1e-4, atol=1e-6, msg=name)
    for name, value in dmp.state_dict().items():
        if not hasattr(value, "local_shards"):
            torch.testing.assert_close(value, full[name], rtol=1e-4, atol=1e-6, msg=name)


def _reference_step(reference: nn.Module, optim: torch.optim.Optimizer, step: int) -> torch.Tensor:
    optim.zero_grad()
    loss = torch.stack([reference(_batch(step, r))[0] for r in range(WORLD)]).mean()
    loss.backward()
    return loss


def _parity_body(rank: int, world: int, granularity: str, optimizer: str) -> Dict[str, Any]:
    shared = granularity == "per_sample" or optimizer == "adagrad"
    options = MemRecOptions(num_token_rows=30, num_weight_rows=7, num_token_hashes=2, num_weight_hashes=2,
                            shared_tables=shared, pooling="mean" if optimizer == "sgd" else "sum",
                            granularity=granularity, seed=5)
    model, _ = _build(options, seed=0)
    reference = copy.deepcopy(model)
    dmp, optim = _shard(model, options, optimizer)
    _copy_into_shards(dmp, reference)
    _assert_matches_reference(dmp, reference)
    sharded_type = type(dmp.module.sparse).__name__
    plan = {n: p.sharding_type for n, p in dmp.plan.plan["sparse"].items()}  # type: ignore[union-attr]

    cls, kwargs = OPTIMIZERS[optimizer]
    ref_optim = cls(reference.parameters(), **kwargs)
    weight_grads = []
    for step in range(STEPS):
        batch = _batch(step, rank)
        with torch.no_grad():  # the sparse arch alone, then the whole model
            got = dmp.module.sparse(batch.sparse_features).wait().to_dict()
            want = reference.sparse(batch.sparse_features).to_dict()
            want_logits = reference(batch)[1]
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6)
        optim.zero_grad()
        loss, logits = dmp(batch)
        loss.backward()
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-6)
        weight_grads.append(dmp.module.sparse.weight_table.grad.clone())
        optim.step()
        _reference_step(reference, ref_optim, step)
        torch.testing.assert_close(weight_grads[-1], reference.sparse.weight_table.grad, rtol=1e-4, atol=1e-7)
        ref_optim.step()
    _assert_matches_reference(dmp, reference)

    state = copy.deepcopy(dmp.state_dict())  # sharded save / load round trip into a fresh DMP
    fresh, _ = _build(options, seed=123)
    fresh_dmp, _ = _shard(fresh, options, optimizer)
    fresh_dmp.load_state_dict(state)
    _assert_matches_reference(fresh_dmp, reference)
    with torch.no_grad():
        batch = _batch(99, rank)
        torch.testing.assert_close(fresh_dmp(batch)[1], dmp(batch)[1], rtol=0, atol=0)
    # plain lists: tensors sent through the result queue would share memory with an exiting process
    return {"plan": plan, "sharded_type": sharded_type, "weight_grads": [g.flatten().tolist() for g in weight_grads],
            "weight_table": dmp.module.sparse.weight_table.detach().flatten().tolist()}


@pytest.mark.parametrize("granularity,optimizer", [
    ("per_token", "sgd"), ("per_token", "adagrad"), ("per_sample", "sgd"),
])
def test_sharded_matches_unsharded_after_steps(granularity: str, optimizer: str) -> None:
    results = run_multiprocess(_parity_body, world_size=WORLD, args=(granularity, optimizer))
    first = results[0]
    assert first["sharded_type"] == "ShardedMemRecEmbeddingBag"
    assert "memrec_weights" not in first["plan"]  # replicated by DDP, not a planned table
    assert all(t == "row_wise" for n, t in first["plan"].items() if n.startswith("memrec_tokens"))
    for r in results:  # the weight table learns on every rank and stays replicated (bit for bit)
        assert all(any(v != 0 for v in g) for g in r["weight_grads"])
        assert r["weight_grads"] == first["weight_grads"]
        assert r["weight_table"] == first["weight_table"]


def _pipeline_body(rank: int, world: int) -> Dict[str, Any]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from sharding.memrec import ShardedMemRecEmbeddingBag

    options = MemRecOptions(num_token_rows=30, num_weight_rows=7, num_token_hashes=2, num_weight_hashes=2,
                            shared_tables=False, pooling="mean", seed=5)
    model, _ = _build(options, seed=0)
    reference = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    piped, piped_optim = _shard(model, options, "sgd")
    plain, plain_optim = _shard(plain_model, options, "sgd")
    _copy_into_shards(piped, reference)
    _copy_into_shards(plain, reference)

    batches = [_batch(step, rank) for step in range(STEPS + 1)]
    pipeline = TrainPipelineSparseDist(piped, piped_optim, torch.device("cpu"), execute_all_batches=True)
    iterator = iter(batches)
    piped_logits = []
    while True:
        try:
            piped_logits.append(pipeline.progress(iterator))
        except StopIteration:
            break
    pipelined = [type(m).__name__ for m in pipeline._pipelined_modules]  # private: no public accessor in 1.8
    is_pipelined = piped.module.sparse.is_pipelined

    plain_logits = []
    for batch in batches:
        plain_optim.zero_grad()
        loss, logits = plain(batch)
        loss.backward()
        plain_optim.step()
        plain_logits.append(logits)
    assert len(piped_logits) == len(plain_logits) == len(batches)
    for a, b in zip(piped_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain_state = plain.state_dict()
    for name, value in piped.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard, other in zip(value.local_shards(), plain_state[name].local_shards()):
                torch.testing.assert_close(shard.tensor, other.tensor, rtol=1e-5, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(value, plain_state[name], rtol=1e-5, atol=1e-7, msg=name)
    assert isinstance(piped.module.sparse, ShardedMemRecEmbeddingBag)
    changed = not torch.equal(piped.module.sparse.weight_table, reference.sparse.weight_table)
    return {"pipelined": pipelined, "is_pipelined": is_pipelined, "weight_table_changed": changed}


def test_train_pipeline_pipelines_the_module_and_matches_a_plain_loop() -> None:
    for result in run_multiprocess(_pipeline_body, world_size=WORLD):
        assert result["pipelined"] == ["ShardedMemRecEmbeddingBag"]
        assert result["is_pipelined"] is True
        assert result["weight_table_changed"]


@pytest.mark.parametrize("granularity", ["per_token", "per_sample"])
def test_planner_places_tables_on_a_two_node_cuda_topology(granularity: str) -> None:
    """Planning needs no process group or GPU: a meta model on 2 nodes x 2 GPUs."""
    options = MemRecOptions(num_token_rows=1000, num_weight_rows=100, num_token_hashes=2, granularity=granularity,
                            shared_tables=granularity == "per_sample")
    ctx = SparseArchContext(feature_names=FEATURES, num_embeddings_per_feature=[10**6] * 3, embedding_dim=16,
                            device=torch.device("meta"), pooling_factors=[1.0, 2.0, 3.0])
    model = _Model(build(ctx, options), FEATURES)
    apply_optimizer_in_backward(torch.optim.Adagrad, model.sparse.token_ebc.parameters(), {"lr": 0.1})
    constraints = default_constraints(model.sparse, options, TopologyInfo(4, 2, "cuda"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=4, local_world_size=2, compute_device="cuda"),
                                       constraints=constraints)
    plan = planner.plan(model, sharders_for(model)).plan["sparse"]
    tokens = [c.name for c in model.sparse.embedding_bag_configs()]
    assert set(plan) == set(tokens)  # type: ignore[arg-type]
    for name in tokens:
        assert (plan[name].sharding_type, plan[name].compute_kernel) == ("table_row_wise", "fused")
        assert len(plan[name].ranks) == 2  # row shards stay inside one node


def test_sharder_offers_only_token_tables_and_rejects_a_plan_naming_the_weight_table() -> None:
    options = MemRecOptions(num_token_rows=10, num_weight_rows=10)
    model, _ = _build(options, seed=0)
    params = MemRecEmbeddingBagCollectionSharder().shardable_parameters(model.sparse)
    assert set(params) == {"memrec_tokens"}
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu")).plan(
        model, sharders_for(model)).plan["sparse"]
    assert set(plan) == {"memrec_tokens"}  # type: ignore[arg-type]
    _check_plan(plan, ["memrec_tokens"], "memrec_weights")  # type: ignore[arg-type]
    stale = dict(plan, memrec_weights=plan["memrec_tokens"])  # type: ignore[index]
    with pytest.raises(ValueError, match="memrec_weights.*replicated weight table"):
        _check_plan(stale, ["memrec_tokens"], "memrec_weights")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks"):
        _check_plan({}, ["memrec_tokens"], "memrec_weights")


def test_keep_in_graph_ties_the_weight_table_without_touching_the_output() -> None:
    """The output is the lookup result itself (no copy, no add); the weight table gets a zero gradient (DDP)."""
    from sharding.memrec import _KeepInGraph

    values = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(5, 1, requires_grad=True)
    out = _KeepInGraph.apply(values, weight)
    assert out.data_ptr() == values.data_ptr() and torch.equal(out, values)
    g = torch.randn(4, 6)
    out.backward(g)
    assert torch.equal(values.grad, g)
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(5, 1))
