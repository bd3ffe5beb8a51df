"""Sharded hash / robe / qr on 2 gloo ranks against the single-process module, from the same initial state.

Inner tables row_wise (fused TBE, optimizer applied in backward), placed by the planner through each
method's default constraints. Sharded gradients are averaged over ranks, so the reference minimises the
mean of the per-rank losses on the union of the ranks' batches. ``parity_body`` is shared with
``test_lma_sharded``; one spawn per method runs SGD and then Adagrad.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

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

from embeddings import registry
from embeddings.id_counts import IdCounts
from embeddings.types import SparseArchContext, TopologyInfo
from tests.dist_utils import run_multiprocess
from trainer.train.optim import embedding_table_parameters
from sharding.sharders import sharders_for

FEATURES = ["f0", "f1", "f2"]
SIZES = [40, 25, 60]
DIM = 8
BATCH = 4
STEPS = 3
WORLD = 2
OPTIMIZERS: Dict[str, Tuple[type, Dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
}


class _Model(nn.Module):
    """Sparse arch + linear head; ``forward(batch) -> (loss, logits)`` as TrainPipelineSparseDist wants."""

    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse
        self.head = nn.Linear(DIM * len(FEATURES), 1)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.sparse(batch.sparse_features).to_dict()
        logits = self.head(torch.cat([pooled[k] for k in FEATURES], dim=1)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def make_batch(step: int, rank: int) -> Batch:
    """Multi-hot bags (empty ones too) of raw ids: negative, above 2**32, and repeated small ones."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 4, (len(FEATURES) * BATCH,), generator=gen)
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    values[::2] = torch.randint(0, 20, values[::2].shape, generator=gen)  # repeated ids -> shared rows
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
    return Batch(dense_features=torch.zeros(BATCH, 1), sparse_features=kjt, labels=labels)


def build_model(method: str, options: Dict[str, Any], seed: int, device: str = "cpu",
                counts: Optional[IdCounts] = None) -> Tuple[_Model, Any]:
    spec = registry.get(method)
    opts = spec.options_type(**options)
    torch.manual_seed(seed)
    ctx = SparseArchContext(feature_names=FEATURES, num_embeddings_per_feature=SIZES, embedding_dim=DIM,
                            device=torch.device(device), pooling_factors=[1.5] * len(FEATURES), id_counts=counts)
    return _Model(spec.build(ctx, opts)), opts


def _shard(model: _Model, method: str, opts: Any, optimizer: str) -> Tuple[DistributedModelParallel, Any]:
    cls, kwargs = OPTIMIZERS[optimizer]
    return shard_with(model, method, opts, cls, kwargs, cls)


def shard_with(model: nn.Module, method: str, opts: Any, cls: type, kwargs: Dict[str, float],
               dense_cls: type, data_parallel: bool = False) -> Tuple[DistributedModelParallel, Any]:
    """The model on 2 ranks with ``cls`` fused into its tables and ``dense_cls`` over everything else; with
    ``data_parallel`` every table is planned data_parallel (replicated)."""
    spec = registry.get(method)
    apply_optimizer_in_backward(cls, embedding_table_parameters(model.sparse), dict(kwargs))  # before planning
    sharders = sharders_for(model)
    constraints = spec.default_constraints(model.sparse, opts, TopologyInfo(WORLD, WORLD, "cpu"))
    if data_parallel:
        constraints = {name: dataclasses.replace(c, sharding_types=["data_parallel"], compute_kernels=["dense"])
                       for name, c in constraints.items()}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optim = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense, lambda p: dense_cls(p, **kwargs))])
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


def _assert_matches(dmp: DistributedModelParallel, reference: nn.Module) -> int:
    full = reference.state_dict()
    shards = 0
    for name, tensor, (row, col) in _local_shards(dmp):
        torch.testing.assert_close(tensor, full[name][row:row + tensor.shape[0], col:col + tensor.shape[1]],
                                   rtol=1e-4, atol=1e-6, msg=name)
        shards += 1
    for name, value in dmp.state_dict().items():
        if not hasattr(value, "local_shards"):
            torch.testing.assert_close(value, full[name], rtol=1e-4, atol=1e-6, msg=name)
    return shards


def parity_body(rank: int, world: int, method: str, options: Dict[str, Any],
                counts: Optional[IdCounts] = None) -> Dict[str, Any]:
    """For SGD and Adagrad: sharded == unsharded outputs, logits and tables after STEPS steps."""
    out: Dict[str, Any] = {}
    for optimizer in OPTIMIZERS:
        model, opts = build_model(method, options, seed=0, counts=counts)
        reference = copy.deepcopy(model)
        dmp, optim = _shard(model, method, opts, optimizer)
        _copy_into_shards(dmp, reference)
        cls, kwargs = OPTIMIZERS[optimizer]
        ref_optim = cls(reference.parameters(), **kwargs)
        moved = 0.0
        for step in range(STEPS):
            batch = make_batch(step, rank)
            with torch.no_grad():
                got = dmp.module.sparse(batch.sparse_features).wait().to_dict()
                want = reference.sparse(batch.sparse_features).to_dict()
                want_logits = reference(batch)[1]
            assert sorted(got) == sorted(FEATURES) and all(got[k].shape == (BATCH, DIM) for k in FEATURES)
            for key, value in want.items():
                torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6)
            optim.zero_grad()
            loss, logits = dmp(batch)
            loss.backward()
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-6)
            optim.step()
            ref_optim.zero_grad()
            torch.stack([reference(make_batch(step, r))[0] for r in range(world)]).mean().backward()
            ref_optim.step()
        shards = _assert_matches(dmp, reference)
        initial = build_model(method, options, seed=0, counts=counts)[0].state_dict()
        for name, value in reference.state_dict().items():
            moved = max(moved, float((value - initial[name]).abs().max()))
        out[optimizer] = {"shards": shards, "moved": moved,
                          "plan": {n: p.sharding_type for n, p in dmp.plan.plan["sparse"].items()}}  # type: ignore[union-attr]
        out["sharded_type"] = type(dmp.module.sparse).__name__
    return out


def check_parity_results(results: List[Dict[str, Any]], tables: List[str]) -> None:
    for result in results:
        assert result["sharded_type"] == "ShardedRemappedEmbeddingBagCollection"
        for optimizer in OPTIMIZERS:
            r = result[optimizer]
            assert r["moved"] > 1e-3, "training changed nothing: the parity would be vacuous"
            assert r["shards"] >= 1
            assert sorted(r["plan"]) == sorted(tables)
            assert set(r["plan"].values()) == {"row_wise"}


@pytest.mark.parametrize("method,options,tables", [
    ("hash", {"num_rows": 16, "pooling": "mean", "seed": 3}, ["hash_f0", "hash_f1", "hash_f2"]),
    ("robe", {"num_rows": 30, "chunk_size": 4, "seed": 3, "feature_groups": [["f1"], ["f0", "f2"]]},
     ["robe_memory_0", "robe_memory_1"]),
    ("qr", {"num_collisions": 4, "pooling": "mean", "remainder_init": "uniform", "seed": 3},
     ["qr_quotient", "qr_remainder"]),
])
def test_sharded_matches_unsharded_after_steps(method: str, options: Dict[str, Any], tables: List[str]) -> None:
    check_parity_results(run_multiprocess(parity_body, world_size=WORLD, args=(method, options)), tables)


@pytest.mark.parametrize("method,options,message", [
    ("robe", {"num_rows": 30, "chunk_size": 2}, "multiples of 4"),
])
def test_constraints_reject_unshardable_settings(method: str, options: Dict[str, Any], message: str) -> None:
    model, opts = build_model(method, options, seed=0)
    with pytest.raises(ValueError, match=message):
        registry.get(method).default_constraints(model.sparse, opts, TopologyInfo(2, 2, "cpu"))


def _pipeline_body(rank: int, world: int, method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    model, opts = build_model(method, options, seed=0)
    reference = copy.deepcopy(model)
    piped, piped_optim = _shard(model, method, opts, "adagrad")
    plain, plain_optim = _shard(copy.deepcopy(reference), method, opts, "adagrad")
    _copy_into_shards(piped, reference)
    _copy_into_shards(plain, reference)
    batches = [make_batch(step, rank) for step in range(STEPS + 1)]
    pipeline = TrainPipelineSparseDist(piped, piped_optim, torch.device("cpu"), execute_all_batches=True)
    iterator = iter(batches)
    piped_logits = []
    while True:
        try:
            piped_logits.append(pipeline.progress(iterator))
        except StopIteration:
            break
    plain_logits = []
    for batch in batches:
        plain_optim.zero_grad()
        loss, logits = plain(batch)
        loss.backward()
        plain_optim.step()
        plain_logits.append(logits)
    assert len(piped_logits) == len(plain_logits)
    for a, b in zip(piped_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain_shards = {(name, tuple(offset)): tensor for name, tensor, offset in _local_shards(plain)}
    for name, tensor, offset in _local_shards(piped):
        torch.testing.assert_close(tensor, plain_shards[(name, tuple(offset))], rtol=1e-5, atol=1e-7, msg=name)
    pipelined = [type(m).__name__ for m in pipeline._pipelined_modules]  # private: no public accessor in 1.8
    return {"pipelined": pipelined, "is_pipelined": bool(piped.module.sparse.is_pipelined)}


def test_train_pipeline_pipelines_the_sharded_module_and_matches_a_plain_loop() -> None:
    """QR: the input dist carries an aux dict to ``finish`` and an all-reduce of the per-id stride."""
    options = {"num_collisions": 4, "pooling": "mean", "remainder_init": "uniform", "seed": 3}
    for result in run_multiprocess(_pipeline_body, world_size=WORLD, args=("qr", options)):
        assert result == {"pipelined": ["ShardedRemappedEmbeddingBagCollection"], "is_pipelined": True}
