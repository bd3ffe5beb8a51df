"""``WeightGradSwitch``: inside its block fbgemm's weighted TBE gives the lookup weights no gradient (its weight-
gradient kernel skips every feature); the rows' update and the output are unchanged, and outside the block
nothing changes."""

from __future__ import annotations

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn

from sharding.tbe_weight_grad import WeightGradSwitch


def _holder() -> nn.Module:
    holder = nn.Module()
    holder.tbe = SplitTableBatchedEmbeddingBagsCodegen(  # type: ignore[assignment]
        [(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.5,
        feature_table_map=[0, 0], pooling_mode=PoolingMode.SUM)
    return holder


def _step(holder: nn.Module) -> tuple:
    indices, offsets = torch.tensor([1, 2, 3, 1]), torch.tensor([0, 1, 2, 3, 4])
    weights = torch.tensor([0.5, 2.0, -1.0, 3.0], requires_grad=True)
    out = holder.tbe(indices, offsets, per_sample_weights=weights)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), weights.grad, holder.tbe.split_embedding_weights()[0].detach().clone()


def test_switch_turns_the_weight_gradient_off_only_inside_its_block() -> None:
    torch.manual_seed(0)
    plain, switched = _holder(), _holder()
    rows = torch.randn(10, 4)
    with torch.no_grad():
        plain.tbe.split_embedding_weights()[0].copy_(rows)
        switched.tbe.split_embedding_weights()[0].copy_(rows)
    switch = WeightGradSwitch([switched])
    assert switch.kernels == [switched.tbe]

    out_a, grad_a, rows_a = _step(plain)
    with switch.without_weight_grad():
        out_b, grad_b, rows_b = _step(switched)
    assert torch.equal(out_a, out_b) and torch.equal(rows_a, rows_b)  # same output, same fused SGD update
    assert grad_a is not None and bool(grad_a.abs().gt(0).all())
    assert grad_b is None or not grad_b.any()

    _, grad_c, _ = _step(switched)  # outside the block: as before
    assert grad_c is not None and bool(grad_c.abs().gt(0).all())
