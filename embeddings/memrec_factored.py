"""MEM-REC's weight gradient from the pooled outputs: the factored training path of the per-token layout.

A weighted bag whose lookups all carry the *same* weight row g pools to ``z = w[g] * sum_l M[t_l]``: one scalar
alpha = w[g] times an unweighted bag. With one raw id per bag and kw = 1 (K any) every bag of
:class:`embeddings.memrec_layout.PerTokenLayout` has that form, and so does any bag whose ids happen to share
their weight row. For such a batch the token lookup can run *unweighted* and alpha be applied to the pooled
output, so that the weight gradient comes from the outputs::

    dL/dalpha(bag) = <dL/dz(bag), sum_l M[t_l]>          dL/dM[t_l] = alpha(bag) * dL/dz(bag)

instead of fbgemm's per-lookup weight gradient (``split_embedding_codegen_grad_indice_weights``, a second
pass over every gathered row that TBE runs whenever a lookup is weighted, even with weights that need no
gradient). The values and gradients are those of the weighted lookup (same maths, other rounding order).

- :func:`factor_bags` (data-parallel side, no autograd, parameter free): whether a KJT of (token row, weight
  row) lookups is factorable, and the weight row of each bag.
- :func:`scale_bags` (after the output dist): ``alpha * pooled`` in place, with the gradients above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

#: |alpha| below this keeps the bag's unweighted row for the backward (see :class:`_ScaleBags`).
TINY_ALPHA = 2.0**-40


@dataclass
class FactoredBags:
    """Per bag (feature-major, ``[F * B]``): the stacked-weight-table row of its lookups, and whether it has any."""

    rows: torch.Tensor  # int64 [F * B]; 0 for an empty bag
    nonempty: torch.Tensor  # bool [F * B]

    def record_stream(self, stream: torch.Stream) -> None:
        self.rows.record_stream(stream)
        self.nonempty.record_stream(stream)


def is_factorable(kjt: KeyedJaggedTensor) -> bool:
    """Whether all lookups of every bag of ``kjt`` carry the same weight row (``kjt.weights()``).

    One host read of the longest bag; bags of more than one lookup are compared lookup by lookup."""
    lengths = kjt.lengths()
    if lengths.numel() == 0 or int(lengths.max()) <= 1:
        return True
    rows = kjt.weights()
    first = kjt.offsets()[:-1]
    first_of_lookup = torch.repeat_interleave(first, lengths.to(torch.int64), output_size=rows.numel())
    return bool(torch.equal(rows, rows.index_select(0, first_of_lookup)))


def factor_bags(kjt: KeyedJaggedTensor, key_row_offsets: Optional[torch.Tensor]) -> FactoredBags:
    """Weight row of every bag of a factorable ``kjt`` (weights = weight rows as float32).

    ``key_row_offsets`` [F]: first row of each key's weight table in the stacked parameter (None: one shared
    table)."""
    lengths = kjt.lengths()
    rows = kjt.weights().to(torch.int64)
    nonempty = lengths > 0
    first = kjt.offsets()[:-1].to(torch.int64)
    if rows.numel() == 0:
        bag_rows = torch.zeros_like(first)
    else:
        bag_rows = torch.where(nonempty, rows.index_select(0, first.clamp(max=rows.numel() - 1)), 0)
    if key_row_offsets is not None:
        bag_rows = bag_rows + key_row_offsets.repeat_interleave(kjt.stride())
    return FactoredBags(bag_rows, nonempty)


def without_weights(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``kjt`` as an unweighted KJT (same structure and cached per-key metadata)."""
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths_or_none(),
        offsets=kjt.offsets_or_none(),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key_or_none(),
        offset_per_key=kjt.offset_per_key_or_none(),
    )


def bag_alpha(bags: FactoredBags, weight_table: torch.Tensor, num_keys: int,
              key_order: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, F]`` alpha of every bag (0 for empty ones), columns in the output's key order ``key_order``
    (indices into the feature order; None = feature order). Differentiable in ``weight_table``."""
    gathered = weight_table.view(-1).index_select(0, bags.rows)
    alpha = torch.where(bags.nonempty, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))
    alpha = alpha.view(num_keys, -1)
    if key_order is not None:
        alpha = alpha.index_select(0, key_order)
    return alpha.t()


class _ScaleBags(torch.autograd.Function):
    """``pooled[b, f, :] *= alpha[b, f]`` in place (no [B, F * dim] allocation: on CPU a fresh one costs a
    page fault per 4 KiB), returning ``pooled``.

    Backward: ``grad * alpha`` for the pooled rows and ``<grad, z> / alpha`` for alpha, where ``z`` is the
    scaled output kept from forward (``z / alpha`` is the unweighted row to ~1 ulp). Bags with
    ``|alpha| < TINY_ALPHA`` (0 included) keep their unweighted row from before the scaling, so their
    gradient needs no division."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, pooled: torch.Tensor,  # type: ignore[override]
                alpha: torch.Tensor) -> torch.Tensor:
        batch, num_keys = alpha.shape
        rows = pooled.view(batch * num_keys, -1)
        tiny = alpha.detach().abs().reshape(-1) < TINY_ALPHA
        tiny_index = tiny.nonzero().squeeze(1) if bool(tiny.any()) else None
        kept = rows.index_select(0, tiny_index) if tiny_index is not None else None
        rows.mul_(alpha.detach().reshape(-1, 1))
        ctx.mark_dirty(pooled)
        ctx.save_for_backward(pooled, alpha.detach(), kept, tiny_index)
        return pooled

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        z, alpha, kept, tiny_index = ctx.saved_tensors  # type: ignore[attr-defined]
        batch, num_keys = alpha.shape
        grad_rows = grad.reshape(batch * num_keys, -1)
        z_rows = z.view(batch * num_keys, -1)
        grad_pooled = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_pooled = (grad_rows * alpha.reshape(-1, 1)).view(z.shape)
        grad_alpha = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            dots = torch.bmm(grad_rows.unsqueeze(1), z_rows.unsqueeze(2)).view(-1)
            safe = alpha.reshape(-1)
            if tiny_index is not None:
                safe = safe.index_fill(0, tiny_index, 1.0)
            grad_alpha = dots / safe
            if tiny_index is not None:
                exact = (grad_rows.index_select(0, tiny_index) * kept).sum(1)
                grad_alpha = grad_alpha.index_copy(0, tiny_index, exact)
            grad_alpha = grad_alpha.view(batch, num_keys)
        return grad_pooled, grad_alpha


def scale_bags(pooled: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``pooled`` ([B, F * dim], contiguous, owned by the caller) scaled per bag by ``alpha`` [B, F], in place."""
    if pooled.dim() != 2 or alpha.dim() != 2 or pooled.shape[0] != alpha.shape[0] or \
            pooled.shape[1] % max(1, alpha.shape[1]):
        raise ValueError(f"scale_bags: pooled {tuple(pooled.shape)} does not fit alpha {tuple(alpha.shape)}")
    if not pooled.is_contiguous():
        pooled = pooled.contiguous()
    return _ScaleBags.apply(pooled, alpha)


def key_order(keys: Sequence[str], feature_index: dict, device: torch.device,
              cache: dict) -> Optional[torch.Tensor]:
    """Indices (into the feature order) of the output's keys, None when they are already in feature order."""
    index: List[int] = [feature_index[k] for k in keys]
    if index == list(range(len(index))):
        return None
    key = (tuple(keys), str(device))
    order = cache.get(key)
    if order is None:
        order = torch.tensor(index, dtype=torch.int64, device=device)
        cache[key] = order
    return order
