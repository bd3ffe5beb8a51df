"""Hot rows sharded: 2 gloo ranks equal the single-process module after SGD and Adagrad steps, for every method
whose hot rows live in its inner tables (hash, robe, qr, memrec), sized by one byte budget."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from embeddings.id_counts import FrequencyCounter, IdCounts
from tests.dist_utils import run_multiprocess
from tests.sharding.test_baselines_sharded import (
    FEATURES,
    OPTIMIZERS,
    STEPS,
    WORLD,
    build_model,
    make_batch,
    parity_body,
)


def _counts() -> IdCounts:
    """Counts of the ids the parity steps train on: the small repeated ids become the hot ones."""
    counter = FrequencyCounter(len(FEATURES))
    for step in range(STEPS):
        for rank in range(WORLD):
            kjt = make_batch(step, rank).sparse_features
            for f, name in enumerate(FEATURES):
                counter.add(f, kjt[name].values().numpy())
    return counter.result(FEATURES)


@pytest.mark.parametrize("method,options,sharded", [
    ("hash", {"pooling": "mean", "seed": 3}, "ShardedRemappedEmbeddingBagCollection"),
    ("robe", {"chunk_size": 4, "seed": 3}, "ShardedRemappedEmbeddingBagCollection"),
    ("qr", {"pooling": "mean", "remainder_init": "uniform", "seed": 3}, "ShardedRemappedEmbeddingBagCollection"),
    ("memrec", {"num_token_hashes": 2, "seed": 5, "pooling": "mean"}, "ShardedMemRecEmbeddingBag"),
])
def test_hot_rows_sharded_match_unsharded_after_steps(method: str, options: Dict[str, Any], sharded: str) -> None:
    counts = _counts()
    options = {**options, "budget": 0.9 if method == "qr" else 0.5, "hot_share": 0.4, "hot_min_count": 2}
    hot = build_model(method, options, seed=0, counts=counts)[0].sparse.layout.hot
    assert hot.total >= 10 and all(size > 0 for size in hot.sizes)  # every feature has hot ids in the batches
    results: List[Dict[str, Any]] = run_multiprocess(parity_body, world_size=WORLD, args=(method, options, counts))
    for result in results:
        assert result["sharded_type"] == sharded
        for optimizer in OPTIMIZERS:
            assert result[optimizer]["moved"] > 1e-3, "training changed nothing: the parity would be vacuous"
            tables = result[optimizer]["plan"]
            assert {t for n, t in tables.items() if not n.endswith("_weights")} == {"row_wise"}
