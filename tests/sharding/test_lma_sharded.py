"""Sharded LMA on 2 gloo ranks against the single-process module (SGD and Adagrad), the dictionary
replicated on every rank, and planning for a 2-node GPU topology from a ``meta`` model (header-only read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.lma import SPEC, LmaEmbeddingBagCollection, LmaOptions
from embeddings.types import TopologyInfo
from tests.dist_utils import run_multiprocess
from tests.embeddings.test_lma import write_synthetic_index
from tests.sharding.test_baselines_sharded import FEATURES, WORLD, build_model, check_parity_results, parity_body
from sharding.sharders import sharders_for


def _lma_body(rank: int, world: int, options: Dict[str, Any]) -> Dict[str, Any]:
    result = parity_body(rank, world, "lma", options)
    # the dictionary is loaded on every rank and routes the planted shared values to the same rows
    model, _ = build_model("lma", options, seed=0)
    keys = model.sparse.lma_index_keys
    result["dictionary"] = [int(keys.numel()), int(keys.sum()), int(model.sparse.lma_index_rows.sum())]
    return result


def test_sharded_lma_matches_unsharded_after_steps(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    write_synthetic_index(path, num_chunks=2, num_hashes=2, seed=3)
    options = {"num_rows": 30, "chunk_size": 4, "num_hashes": 2, "seed": 3, "index_path": str(path),
               "pooling": "mean"}
    results = run_multiprocess(_lma_body, world_size=WORLD, args=(options,))
    check_parity_results(results, ["lma_memory"])
    assert results[0]["dictionary"] == results[1]["dictionary"] and results[0]["dictionary"][0] == 60


def test_planner_places_the_array_table_row_wise_on_two_nodes(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    write_synthetic_index(path, num_chunks=2, num_hashes=2, seed=3)
    options = LmaOptions(memory_fraction=0.5, chunk_size=4, num_hashes=2, seed=3, index_path=str(path))
    model, _ = build_model("lma", {"memory_fraction": 0.5, "chunk_size": 4, "num_hashes": 2, "seed": 3,
                                   "index_path": str(path)}, seed=0, device="meta")
    assert isinstance(model.sparse, LmaEmbeddingBagCollection) and model.sparse.lma_index_keys.is_meta
    apply_optimizer_in_backward(torch.optim.Adagrad, model.sparse.ebc.parameters(), {"lr": 0.1})
    constraints = SPEC.default_constraints(model.sparse, options, TopologyInfo(4, 2, "cuda"))
    assert constraints["lma_memory"].pooling_factors == [1.5] * (2 * len(FEATURES))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=4, local_world_size=2, compute_device="cuda"),
                                       constraints=constraints)
    plan = planner.plan(model, sharders_for(model)).plan["sparse"]
    assert set(plan) == {"lma_memory"}  # type: ignore[arg-type]
    placed = plan["lma_memory"]  # type: ignore[index]
    assert (placed.sharding_type, placed.compute_kernel) == ("table_row_wise", "fused")
    assert len(placed.ranks) == 2  # row shards stay inside one node
