"""Replicated tables on the fused operator inside DMP (``sharding.fused``): where the plan places every table of a
compressed module data_parallel, the whole embedding stage is one fused call per rank and the backward applies the
union update on every replica. After 20 steps of SGD, Adagrad and row-wise Adagrad on 2 gloo ranks (each rank on
its own batch, the head under DDP) the tables, the head and the fused optimizer state equal one unsharded module
trained on the union of the batches, and the replicas are bitwise equal. The optimizer state is in DMP's fused
optimizer (checkpointed by DCP): a save -> load into a fresh model restores it exactly."""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from embeddings.ops import chunk_bag
from sharding.fused import ReplicatedFusedEmbeddingBagCollection
from tests.dist_utils import run_multiprocess
from tests.sharding import test_baselines_sharded as base
from tests.sharding.test_chunk_bag_sharded import OPTIMIZERS, STEPS, _union
from tests.sharding.test_hot_rows_sharded import _counts
from trainer.train.optim import embedding_table_parameters


def _state(optim: Any) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for param, entries in optim.state_dict()["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                out[f"{param}/{key}"] = value.detach().clone()
    return out


def _body(rank: int, world: int, method: str, options: Dict[str, Any], counts: Any, path: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for optimizer, (cls, kwargs) in OPTIMIZERS.items():
        model, opts = base.build_model(method, options, seed=0, counts=counts)
        reference = copy.deepcopy(model)
        apply_optimizer_in_backward(cls, embedding_table_parameters(reference.sparse), dict(kwargs))
        dense_cls = torch.optim.Adagrad if cls is RowWiseAdagrad else cls
        dense_ref = dense_cls([p for n, p in reference.named_parameters() if not n.startswith("sparse.")],
                              **dict(kwargs))  # type: ignore[arg-type]
        dmp, optim = base.shard_with(model, method, opts, cls, kwargs, dense_cls, data_parallel=True)
        assert isinstance(dmp.module.sparse, ReplicatedFusedEmbeddingBagCollection), type(dmp.module.sparse)
        for step in range(STEPS):
            optim.zero_grad()
            loss, _ = dmp(base.make_batch(step % 7, rank))
            loss.backward()
            optim.step()
            dense_ref.zero_grad()
            reference(_union([base.make_batch(step % 7, r) for r in range(world)]))[0].backward()
            dense_ref.step()
        got = {n.removeprefix("module."): v.detach().clone() for n, v in dmp.state_dict().items()}
        want = reference.state_dict()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=f"{method} {optimizer} {name}")
        moments = {}
        for name, param in reference.sparse.named_parameters():
            state = param._in_backward_optimizers[0].state[param]  # type: ignore[attr-defined]
            if "sum" in state:
                moments[name] = state["sum"]
        fused = _state(dmp.fused_optimizer)
        assert len(fused) == len(moments), (sorted(fused), sorted(moments))
        for key, value in fused.items():
            table = key.split("/")[0].removeprefix("sparse.")
            torch.testing.assert_close(value, moments[table], rtol=1e-4, atol=1e-6, msg=key)
        # DCP round trip of the model and the combined optimizer into a fresh replicated model
        target = f"{path}/{optimizer}"
        dcp.save({"model": dmp.state_dict(), "optim": optim.state_dict()}, checkpoint_id=target)
        fresh, _ = base.build_model(method, options, seed=5, counts=counts)
        dmp2, optim2 = base.shard_with(fresh, method, opts, cls, kwargs, dense_cls, data_parallel=True)
        state = {"model": dmp2.state_dict(), "optim": optim2.state_dict()}
        dcp.load(state, checkpoint_id=target)
        dmp2.load_state_dict(state["model"])
        optim2.load_state_dict(state["optim"])
        for name, value in dmp.state_dict().items():
            torch.testing.assert_close(dmp2.state_dict()[name], value, rtol=0, atol=0, msg=f"loaded {name}")
        for key, value in _state(dmp.fused_optimizer).items():
            torch.testing.assert_close(_state(dmp2.fused_optimizer)[key], value, rtol=0, atol=0, msg=f"loaded {key}")
        initial = base.build_model(method, options, seed=0, counts=counts)[0].state_dict()
        out[optimizer] = {"tables": {n: v for n, v in got.items() if n.startswith("sparse.")},
                          "moved": max(float((v - initial[n]).abs().max()) for n, v in want.items()),
                          "moments": len(fused)}
        dist.barrier()
    return out


@pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")
@pytest.mark.parametrize("method,options", [
    ("hash", {"seed": 3, "budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}),
    ("robe", {"chunk_size": 4, "seed": 3, "pooling": "mean", "budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}),
])
def test_replicated_fused_tables_equal_the_union_step_and_checkpoint(method: str, options: Dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as path:
        results: List[Dict[str, Any]] = run_multiprocess(_body, world_size=base.WORLD,
                                                         args=(method, options, _counts(), path))
    for optimizer in OPTIMIZERS:
        assert results[0][optimizer]["moved"] > 1e-3, "training changed nothing: the parity would be vacuous"
        assert (results[0][optimizer]["moments"] == 0) == (optimizer == "sgd")  # Adagrads checkpoint their state
        for name, value in results[0][optimizer]["tables"].items():
            torch.testing.assert_close(results[1][optimizer]["tables"][name], value, rtol=0, atol=0, msg=name)
