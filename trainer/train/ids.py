"""Id handling for methods whose tables need ids inside ``[0, rows)`` (``ids="table"``, e.g. ``full``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.records import Batch


def reduce_ids(kjt: KeyedJaggedTensor, rows_per_feature: torch.Tensor) -> KeyedJaggedTensor:
    """``id mod rows`` per feature (non-negative for negative ids too), vectorised over the KJT.

    ``rows_per_feature``: int64 tensor with one table size per KJT key, in key order.
    """
    keys = kjt.keys()
    if len(keys) != rows_per_feature.numel():
        raise ValueError(f"KJT has {len(keys)} features but {rows_per_feature.numel()} table sizes were given")
    values = kjt.values()
    if values.numel() == 0:
        return kjt
    modulus = torch.repeat_interleave(rows_per_feature.to(values.device),
                                      torch.tensor(kjt.length_per_key(), device=values.device))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.remainder(values.long(), modulus),
        lengths=kjt.lengths(),
        weights=kjt.weights_or_none(),
        stride=kjt.stride(),
    )


def reduce_ids_into_tables(rows_per_feature: Sequence[int]) -> Callable[[Batch], Batch]:
    """A batch transform for the data path (runs before the pipeline, so pipelining is unaffected)."""
    rows = torch.tensor([int(r) for r in rows_per_feature], dtype=torch.int64)

    def transform(batch: Batch) -> Batch:
        batch.sparse_features = reduce_ids(batch.sparse_features, rows)
        return batch

    return transform
