"""``compactrec train`` with a compressed table replicated on the fused operator (``sharding.fused``): the trainer's
own loop on 2 gloo ranks plans ROBE-Z's array data_parallel, runs it as ``ReplicatedFusedEmbeddingBagCollection``
(TrainPipelineSparseDist, DDP over the MLPs, the fused Adagrad state in DMP's optimizer), checkpoints and resumes
bitwise equal to an uninterrupted run, and keeps the replicas equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from embeddings.ops import chunk_bag
from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from tests.trainer import test_checkpoint as ckpt

ROBE = ["embeddings.options.budget=null", "embeddings.options.hot_share=0", "embeddings.table_sizes=auto",
        "embeddings.options.num_rows=3000", "embeddings.options.chunk_size=4", "optimizer.sparse=adagrad",
        "sharding.tables={robe_memory: {sharding_types: [data_parallel], compute_kernels: [dense]}}",
        "training.evals_per_epoch=2", "data.limit_train_batches=12"]


def _train(rank: int, world_size: int, overrides: List[str]) -> Dict[str, Any]:
    import trainer.train.loop as loop
    from sharding.fused import ReplicatedFusedEmbeddingBagCollection
    from trainer.config import load_config
    from trainer.train.distributed import init_distributed

    built: List[Any] = []
    original = loop.build_sharded_model

    def capture(*args: Any) -> Any:
        model, arch = original(*args)
        built.append(model)
        return model, arch

    loop.build_sharded_model = capture  # type: ignore[assignment]
    config = load_config(ckpt.REPO / "configs" / "robe_small.yaml", overrides)
    result = loop.run_training(config, init_distributed("cpu"))
    return {"result": result, "state": ckpt._local_state(built[0]),
            "replicated": any(isinstance(m, ReplicatedFusedEmbeddingBagCollection) for m in built[0].modules()),
            "optim_keys": sorted(built[0].fused_optimizer.state_dict()["state"])}


@pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")
def test_replicated_fused_training_resumes_bitwise(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ROBE + ["training.checkpoint_every=4", "training.keep_checkpoints=2"]
    full = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, tmp_path / "full") + common,))
    half_dir = tmp_path / "half"
    half = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, half_dir) + common
                                             + ["training.max_steps=6"],))
    resumed = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, half_dir) + common
                                                + ["training.resume=latest"],))
    assert full[0]["replicated"] and resumed[0]["replicated"]
    assert any("robe_memory" in k for k in full[0]["optim_keys"]), full[0]["optim_keys"]
    assert full[0]["result"]["steps"] == resumed[0]["result"]["steps"] == 12
    for rank in range(2):
        ckpt._assert_same_state(full[rank]["state"], resumed[rank]["state"])
        assert full[rank]["result"]["val"] == resumed[rank]["result"]["val"]
    table = "model.sparse_arch.embedding_bag_collection.ebc.embedding_bags.robe_memory.weight"
    state = {k.removeprefix("module."): v for k, v in full[0]["state"].items()}
    other = {k.removeprefix("module."): v for k, v in full[1]["state"].items()}
    key = next(k for k in state if k.endswith(table))
    torch.testing.assert_close(state[key], other[key], rtol=0, atol=0)  # the replicas stayed equal
    with pytest.raises(AssertionError):
        ckpt._assert_same_state(half[0]["state"], full[0]["state"])


def _table(states: List[Dict[str, Any]], key: str) -> torch.Tensor:
    """The whole table ``key`` from every rank's state: row-wise shards (offset, tensor) in row order, or a
    replica."""
    value = states[0][key]
    if not isinstance(value, list):
        return value
    shards = sorted((offset, t) for state in states for offset, t in state[key])
    return torch.cat([t for _, t in shards])


@pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")
def test_a_row_wise_checkpoint_resumes_replicated(tiny_dataset: Path, tmp_path: Path) -> None:
    """A run checkpointed with ROBE-Z's array row-wise on fbgemm's TBE resumes with it replicated on the fused
    operator (DCP re-splits the table and its Adagrad state into the replicas) and ends where an uninterrupted
    row-wise run ends (float32 order: the two updates sum the same gradients in different orders)."""
    row = [o for o in ROBE if not o.startswith("sharding.tables")]
    common = ["training.checkpoint_every=4", "training.keep_checkpoints=2"]
    base = tiny_overrides(tiny_dataset, tmp_path / "run")
    straight = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, tmp_path / "straight") + row + common,))
    half = run_multiprocess(_train, 2, args=(base + row + common + ["training.max_steps=6"],))
    resumed = run_multiprocess(_train, 2, args=(base + ROBE + common + ["training.resume=latest"],))
    assert not straight[0]["replicated"] and resumed[0]["replicated"]
    assert resumed[0]["result"]["steps"] == 12
    key = next(k for k in resumed[0]["state"] if k.endswith("robe_memory.weight"))
    table = _table([r["state"] for r in resumed], key)
    assert table.shape == _table([s["state"] for s in straight], key).shape == (3000, 4)
    torch.testing.assert_close(table, _table([s["state"] for s in straight], key), rtol=1e-4, atol=1e-5)
    assert float((table - _table([h["state"] for h in half], key)).abs().max()) > 1e-4  # the resumed steps moved it
