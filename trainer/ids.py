"""Id handling for methods whose tables need ids inside ``[0, rows)`` (``ids="table"``, e.g. ``full``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.types import Batch


def reduce_ids(kjt: KeyedJaggedTensor, rows_per_feature: Sequence[int]) -> KeyedJaggedTensor:
    """``id mod rows`` per feature (non-negative for negative ids too), vectorised over the KJT."""
    keys = kjt.keys()
    if len(keys) != len(rows_per_feature):
        raise ValueError(f"KJT has {len(keys)} features but {len(rows_per_feature)} table sizes were given")
    values = kjt.values()
    if values.numel() == 0:
        return kjt
    per_key = torch.tensor([int(kjt.length_per_key()[i]) for i in range(len(keys))], device=values.device)
    rows = torch.tensor(list(rows_per_feature), dtype=torch.int64, device=values.device)
    modulus = torch.repeat_interleave(rows, per_key)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.remainder(values.long(), modulus),
        lengths=kjt.lengths(),
        weights=kjt.weights_or_none(),
        stride=kjt.stride(),
    )


def reduce_ids_into_tables(rows_per_feature: Sequence[int]) -> Callable[[Batch], Batch]:
    """A batch transform for the data path (runs before the pipeline, so pipelining is unaffected)."""
    rows = [int(r) for r in rows_per_feature]

    def transform(batch: Batch) -> Batch:
        batch.sparse_features = reduce_ids(batch.sparse_features, rows)
        return batch

    return transform
