"""`full` tables: raw ids reduced mod each feature's table size in the data path."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.records import Batch
from trainer.train.ids import reduce_ids, reduce_ids_into_tables


def _kjt() -> KeyedJaggedTensor:
    # batch of 2: a = [[7, -1], []], b = [[2**40 + 3], [10, 11]]
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([7, -1, 2**40 + 3, 10, 11]),
                             lengths=torch.tensor([2, 0, 1, 2], dtype=torch.int32))


def test_reduce_ids_per_feature_modulus_non_negative() -> None:
    out = reduce_ids(_kjt(), torch.tensor([5, 4]))
    assert out.values().tolist() == [2, 4, (2**40 + 3) % 4, 2, 3]
    assert out.lengths().tolist() == [2, 0, 1, 2] and out.keys() == ["a", "b"]


def test_reduce_ids_checks_table_count() -> None:
    with pytest.raises(ValueError, match="2 features but 3 table sizes"):
        reduce_ids(_kjt(), torch.tensor([5, 4, 3]))


def test_batch_transform() -> None:
    batch = Batch(dense_features=torch.zeros(2, 13), sparse_features=_kjt(), labels=torch.zeros(2))
    out = reduce_ids_into_tables([5, 4])(batch)
    assert out.sparse_features.values().tolist() == [2, 4, 3, 2, 3]
