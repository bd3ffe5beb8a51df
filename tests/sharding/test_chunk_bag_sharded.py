"""The fused chunk-bag path against TorchRec's sharded path: an unsharded module whose tables train with the fused
operator's in-backward update (``embeddings.ops.chunk_bag``, as ``kernel: auto`` runs on CPU) equals the same module
sharded row-wise on 2 gloo ranks (fbgemm TBE, its fused update) after 20 steps of SGD, Adagrad and row-wise
Adagrad, with hot rows. The fused update runs once per lookup call, as fbgemm's TBE does (a module called twice
before one backward updates twice); the reference therefore looks up the union of the ranks' batches once."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.ops import chunk_bag
from tests.dist_utils import run_multiprocess
from tests.sharding import test_baselines_sharded as base
from tests.sharding.test_hot_rows_sharded import _counts
from trainer.train.optim import embedding_table_parameters

STEPS = 20
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.5}),
              "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
              "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.1, "eps": 1e-8})}


def _union(batches: List[Batch]) -> Batch:
    """The ranks' batches as one (the mean loss over it is the mean of the ranks' mean losses): one lookup, so one
    fused update, as in the sharded step, where each TBE call applies its own update."""
    features = [b.sparse_features.to_dict() for b in batches]
    keys = batches[0].sparse_features.keys()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([f[k].values() for k in keys for f in features]),
        lengths=torch.cat([f[k].lengths() for k in keys for f in features]))
    return Batch(dense_features=torch.cat([b.dense_features for b in batches]), sparse_features=kjt,
                 labels=torch.cat([b.labels for b in batches]))


def _body(rank: int, world: int, method: str, options: Dict[str, Any], counts: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for optimizer, (cls, kwargs) in OPTIMIZERS.items():
        model, opts = base.build_model(method, options, seed=0, counts=counts)
        reference = copy.deepcopy(model)
        assert reference.sparse.uses_fused_kernel(torch.device("cpu"))
        apply_optimizer_in_backward(cls, embedding_table_parameters(reference.sparse), dict(kwargs))
        dense_cls = torch.optim.Adagrad if cls is RowWiseAdagrad else cls  # row-wise needs 2-D parameters
        dense_ref = dense_cls([p for n, p in reference.named_parameters() if not n.startswith("sparse.")],
                              **kwargs)
        dmp, optim = base.shard_with(model, method, opts, cls, kwargs, dense_cls)
        base._copy_into_shards(dmp, reference)
        for step in range(STEPS):
            optim.zero_grad()
            loss, logits = dmp(base.make_batch(step % 7, rank))
            loss.backward()
            optim.step()
            dense_ref.zero_grad()
            reference(_union([base.make_batch(step % 7, r) for r in range(world)]))[0].backward()
            dense_ref.step()
        try:
            base._assert_matches(dmp, reference)
        except AssertionError as exc:
            raise AssertionError(f"{method} {optimizer}: {exc}") from None
        initial = base.build_model(method, options, seed=0, counts=counts)[0].state_dict()
        moved = max(float((v - initial[n]).abs().max()) for n, v in reference.state_dict().items())
        out[optimizer] = {"moved": moved,
                          "plan": {n: p.sharding_type for n, p in dmp.plan.plan["sparse"].items()}}  # type: ignore[union-attr]
    return out


@pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")
@pytest.mark.parametrize("method,options", [
    ("hash", {"seed": 3, "budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}),
    ("robe", {"chunk_size": 4, "seed": 3, "pooling": "mean", "budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}),
])
def test_fused_update_equals_sharded_tbe_after_20_steps(method: str, options: Dict[str, Any]) -> None:
    results: List[Dict[str, Any]] = run_multiprocess(_body, world_size=base.WORLD, args=(method, options, _counts()))
    for result in results:
        for optimizer in OPTIMIZERS:
            assert result[optimizer]["moved"] > 1e-3, "training changed nothing: the parity would be vacuous"
            assert set(result[optimizer]["plan"].values()) == {"row_wise"}


def _replica_body(rank: int, world: int, method: str, options: Dict[str, Any], counts: Any,
                  optimizer: str) -> Dict[str, Any]:
    cls, kwargs = OPTIMIZERS[optimizer]
    replica = base.build_model(method, options, seed=0, counts=counts)[0].sparse
    reference = base.build_model(method, options, seed=0, counts=counts)[0].sparse
    for module in (replica, reference):
        apply_optimizer_in_backward(cls, list(module.parameters()), dict(kwargs))
    chunk_bag.replicate(list(replica.parameters()), dist.GroupMember.WORLD)
    for step in range(STEPS):
        batches = [base.make_batch(step % 7, r) for r in range(world)]
        targets = [torch.randn(base.BATCH, len(base.FEATURES) * base.DIM, generator=torch.Generator().manual_seed(
            100 * step + r)) for r in range(world)]
        ((replica(batches[rank].sparse_features).values() - targets[rank]) ** 2).mean().backward()
        ((reference(_union(batches).sparse_features).values() - torch.cat(targets)) ** 2).mean().backward()
    return {"replica": {k: v.clone() for k, v in replica.state_dict().items()},
            "reference": {k: v.clone() for k, v in reference.state_dict().items()},
            "initial": base.build_model(method, options, seed=0, counts=counts)[0].sparse.state_dict()}


@pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_replicated_tables_take_the_union_step_and_stay_equal(optimizer: str) -> None:
    """Replicas (``chunk_bag.replicate``) on 2 gloo ranks, each on its own batch: after 20 steps every replica equals
    the other and the single module trained on the union of the batches (the mean of the ranks' losses)."""
    options = {"chunk_size": 4, "seed": 3, "budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}
    results = run_multiprocess(_replica_body, world_size=base.WORLD, args=("robe", options, _counts(), optimizer))
    for name, value in results[0]["replica"].items():
        torch.testing.assert_close(results[1]["replica"][name], value, rtol=0, atol=0, msg=name)  # bitwise equal
        torch.testing.assert_close(value, results[0]["reference"][name], rtol=1e-5, atol=1e-6, msg=name)
        assert float((value - results[0]["initial"][name]).abs().max()) > 1e-3
