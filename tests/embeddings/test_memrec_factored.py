"""The factored MEM-REC path's maths on one process: which batches factor, bag rows, and the lookup weights plus
``weight_grad_from_outputs`` against the weighted lookup with learned weights they replace (torch's own
weighted EmbeddingBag), in values and gradients."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.memrec.factored import (
    TINY_ALPHA,
    bag_alpha,
    bag_dots,
    factor_bags,
    is_factorable,
    key_order,
    lookup_weight_table,
    weight_grad_from_outputs,
)

DIM = 4


def _kjt(lengths: list, rows: list, keys: tuple = ("a", "b")) -> KeyedJaggedTensor:
    n = len(rows)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.arange(n) % 5,
                                               weights=torch.tensor(rows, dtype=torch.float32),
                                               lengths=torch.tensor(lengths, dtype=torch.int32))


def test_which_batches_factor() -> None:
    assert is_factorable(_kjt([1, 0, 1, 1], [3, 4, 5]))  # one lookup per bag (one-hot, K = kw = 1)
    assert is_factorable(_kjt([2, 0, 2, 2], [3, 3, 4, 4, 5, 5]))  # K = 2, kw = 1: a bag's lookups share their row
    assert not is_factorable(_kjt([2, 0, 2, 2], [3, 3, 4, 6, 5, 5]))  # multi-hot or kw = 2: rows differ in a bag
    assert is_factorable(_kjt([0, 0, 0, 0], []))


def test_bag_rows_with_per_feature_weight_tables() -> None:
    kjt = _kjt([1, 0, 2, 1], [3, 4, 4, 6])  # keys a, b; batch 2
    bags = factor_bags(kjt, None)
    assert bags.rows.tolist() == [3, 0, 4, 6] and bags.nonempty.tolist() == [True, False, True, True]
    bags = factor_bags(kjt, torch.tensor([0, 10]))  # b's table starts at row 10 of the stacked parameter
    assert bags.rows.tolist() == [3, 0, 14, 16]


def _weighted_reference(table: torch.Tensor, weights: torch.Tensor, lookups: torch.Tensor, rows: torch.Tensor,
                        offsets: torch.Tensor) -> torch.Tensor:
    """The existing path: a weighted bag lookup with learned per-lookup weights w[row]."""
    return F.embedding_bag(lookups, table, offsets, mode="sum", per_sample_weights=weights.view(-1)[rows])


@pytest.mark.parametrize("zero_weight", [False, True])
def test_factored_lookup_matches_a_weighted_lookup_in_values_and_gradients(zero_weight: bool) -> None:
    """Lookups weighted by the detached alphas + the weight gradient from the outputs: same output and same
    gradients for the table rows and the weight table, also for weights of exactly 0 and TINY_ALPHA / 2 (looked
    up with weight 1, scaled after) and an empty bag."""
    gen = torch.Generator().manual_seed(0)
    keys, batch = 3, 5
    lengths = torch.randint(0, 3, (keys * batch,), generator=gen)
    lengths[4] = 0
    lengths[0] = 2
    table = torch.randn(20, DIM, generator=gen, dtype=torch.float64)
    weights = torch.randn(7, 1, generator=gen, dtype=torch.float64)
    if zero_weight:
        weights[2] = 0.0
        weights[3] = TINY_ALPHA / 2
    bag_row = torch.randint(0, 7, (keys * batch,), generator=gen)
    bag_row[0], bag_row[1] = 2, 3
    lookups = torch.randint(0, 20, (int(lengths.sum()),), generator=gen)
    rows = torch.repeat_interleave(bag_row, lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])[:-1]

    def to_output(pooled: torch.Tensor) -> torch.Tensor:  # feature-major bags -> [batch, keys * DIM]
        return pooled.view(keys, batch, DIM).transpose(0, 1).reshape(batch, keys * DIM)

    t1, w1 = table.clone().requires_grad_(), weights.clone().requires_grad_()
    want = to_output(_weighted_reference(t1, w1, lookups, rows, offsets))
    grad = torch.randn(batch, keys * DIM, generator=gen, dtype=torch.float64)
    want.backward(grad)

    t2, w2 = table.clone().requires_grad_(), weights.clone().requires_grad_()
    kjt = KeyedJaggedTensor(keys=[f"k{i}" for i in range(keys)], values=lookups, weights=rows.to(torch.float32),
                            lengths=lengths, stride=batch)
    carried = lookup_weight_table(w2).view(-1)[rows]
    assert not carried.requires_grad
    z = to_output(F.embedding_bag(lookups, t2, offsets, mode="sum", per_sample_weights=carried))
    got = weight_grad_from_outputs(z, bag_alpha(factor_bags(kjt, None), w2, keys, None))
    got.backward(grad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(t2.grad, t1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    if zero_weight:
        assert w2.grad[2].abs().item() > 0 and torch.isfinite(w2.grad).all()


def test_tiny_alpha_gradient_is_exact_without_division() -> None:
    unweighted = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # looked up with weight 1
    for alpha_value in (0.0, TINY_ALPHA / 4, -1e-300):
        alpha = torch.tensor([[alpha_value]], dtype=torch.float64, requires_grad=True)
        z = unweighted.clone().requires_grad_()
        out = weight_grad_from_outputs(z * 1.0, alpha)
        assert torch.equal(out.detach(), unweighted * alpha_value)
        out.backward(torch.ones_like(out))
        assert alpha.grad.item() == 10.0 and torch.equal(z.grad, torch.full_like(z, alpha_value))


def test_key_order_maps_output_keys_to_features() -> None:
    cache: dict = {}
    index = {"a": 0, "b": 1, "c": 2}
    assert key_order(["a", "b", "c"], index, torch.device("cpu"), cache) is None
    order: Optional[torch.Tensor] = key_order(["c", "a", "b"], index, torch.device("cpu"), cache)
    assert order is not None and order.tolist() == [2, 0, 1]


def test_weight_grad_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        weight_grad_from_outputs(torch.zeros(2, 7), torch.zeros(2, 3))


@pytest.mark.parametrize("batch", [1, 7, 3000])
def test_bag_dots_equal_plain_dot_products_for_strided_inputs(batch: int) -> None:
    """Chunked through a small buffer (chunks of DOT_CHUNK_ROWS // F samples), on a column slice like the
    gradient of one part of a concatenated output."""
    gen = torch.Generator().manual_seed(batch)
    wide = torch.randn(batch, 5 * DIM + 3, generator=gen)
    a = wide[:, 3:].reshape(batch, 5, DIM)  # a strided view, not contiguous
    b = torch.randn(batch, 5, DIM, generator=gen)
    assert batch == 1 or not a.is_contiguous()
    torch.testing.assert_close(bag_dots(a, b), (a * b).sum(2))
