"""MEM-REC's weight gradient from the pooled outputs: the factored training path of the per-token layout.

A weighted bag whose lookups all carry the *same* weight row g pools to ``z = w[g] * sum_l M[t_l]``: one scalar
alpha = w[g] times an unweighted bag. With one raw id per bag and kw = 1 (K any) every bag of
:class:`embeddings.memrec.layout.PerTokenLayout` has that form, and so does any bag whose ids happen to share
their weight row. For such a batch the weight gradient follows from the pooled outputs::

    dL/dalpha(bag) = <dL/dz(bag), sum_l M[t_l]> = <dL/dz(bag), z(bag)> / alpha(bag)

so the token lookup can keep its weights (alpha, applied inside the lookup, which also scales the rows'
gradient) yet skip fbgemm's per-lookup weight gradient (``split_embedding_codegen_grad_indice_weights``, a
second pass over every gathered row; TBE skips it per feature with ``feature_requires_grad = 0``). The values
and gradients are those of the weighted lookup with a learned weight (same maths, other rounding order).

Bags with ``|alpha| < TINY_ALPHA`` (an exact 0 included), where ``z / alpha`` loses the row, are looked up with
weight 1 and scaled after the lookup, keeping their unweighted row for the gradient.

- :func:`is_factorable`, :func:`factor_bags` (data-parallel side, parameter free): whether a KJT of
  (token row, weight row) lookups factors, and the weight row of each bag.
- :func:`lookup_weight_table` (model-parallel side): the detached weights the lookups carry.
- :func:`weight_grad_from_outputs` (after the output dist): ties alpha into the graph with the gradient above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

#: |alpha| below this is applied after the lookup (its bag keeps the unweighted row for the gradient).
TINY_ALPHA = 2.0**-40


@dataclass
class FactoredBags:
    """Per bag (feature-major, ``[F * B]``): the stacked-weight-table row of its lookups, and whether it has any."""

    rows: torch.Tensor  # int64 [F * B]; a valid row (unused) for an empty bag
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


def lookup_weight_table(weight_table: torch.Tensor) -> torch.Tensor:
    """The weights the factored lookups carry: the table, detached, with every ``|w| < TINY_ALPHA`` set to 1
    (those bags are scaled after the lookup by :func:`weight_grad_from_outputs`)."""
    table = weight_table.detach()
    return torch.where(table.abs() < TINY_ALPHA, torch.ones((), dtype=table.dtype, device=table.device), table)


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


class _WeightGradFromOutputs(torch.autograd.Function):
    """Forward: ``z`` (the lookup output, [B, F * dim], alpha already applied) unchanged (no copy), except the bags
    with a tiny alpha, looked up with weight 1, which are scaled here (then on a copy: rare).

    Backward: ``grad`` passes to the lookup unchanged (the weighted lookup scales the rows' gradient itself),
    tiny bags' rows times alpha; alpha gets ``<grad, z> / alpha``, tiny bags ``<grad, unweighted row>``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor,  # type: ignore[override]
                alpha: torch.Tensor) -> torch.Tensor:
        batch, num_keys = alpha.shape
        flat_alpha = alpha.detach().reshape(-1)
        tiny = flat_alpha.abs() < TINY_ALPHA
        tiny_index = tiny.nonzero().squeeze(1) if bool(tiny.any()) else None
        kept = None
        if tiny_index is not None:  # rare (a weight of ~0): a copy, z may be a view another Function made
            rows = z.reshape(batch * num_keys, -1)
            kept = rows.index_select(0, tiny_index)
            out = rows.index_copy(0, tiny_index, kept * flat_alpha.index_select(0, tiny_index).unsqueeze(1))
            out = out.view(z.shape)
        else:
            out = z.view_as(z)
        # None entries are allowed (torch saves them as None)
        ctx.save_for_backward(out, alpha.detach(), kept, tiny_index)  # type: ignore[arg-type]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        z, alpha, kept, tiny_index = ctx.saved_tensors  # type: ignore[attr-defined]
        batch, num_keys = alpha.shape
        flat_alpha = alpha.reshape(-1)
        grad_z = grad
        grad_rows = grad.reshape(batch * num_keys, -1) if tiny_index is not None else grad
        if tiny_index is not None and ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            scaled = grad_rows.index_select(0, tiny_index) * flat_alpha.index_select(0, tiny_index).unsqueeze(1)
            grad_z = grad_rows.index_copy(0, tiny_index, scaled).view(grad.shape)
        grad_alpha = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            dots = bag_dots(grad.reshape(batch, num_keys, -1), z.view(batch, num_keys, -1)).view(-1)
            if tiny_index is None:
                grad_alpha = dots / flat_alpha
            else:
                grad_alpha = dots / flat_alpha.index_fill(0, tiny_index, 1.0)
                exact = (grad_rows.index_select(0, tiny_index) * kept).sum(1)
                grad_alpha = grad_alpha.index_copy(0, tiny_index, exact)
            grad_alpha = grad_alpha.view(batch, num_keys)
        return (grad_z if ctx.needs_input_grad[0] else None), grad_alpha  # type: ignore[attr-defined]


#: samples x bags per chunk of :func:`bag_dots` ~ this many rows (a 2 MiB buffer at dim 128, cache resident).
DOT_CHUNK_ROWS = 4096


def bag_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, F]`` dot products of the ``[B, F, dim]`` bags of ``a`` and ``b`` (any strides with a unit last one).

    Chunked product + sum through one small reused buffer: no ``[B, F * dim]`` temporary (a fresh one page-faults
    on CPU) and 1.5-2x faster than a batched ``bmm`` of 1 x dim x 1 products on this CPU."""
    batch, num_keys, dim = a.shape
    out = torch.empty(batch, num_keys, dtype=torch.result_type(a, b), device=a.device)
    step = max(1, DOT_CHUNK_ROWS // max(1, num_keys))
    buffer = torch.empty(min(step, batch), num_keys, dim, dtype=out.dtype, device=a.device)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        product = torch.mul(a[start:stop], b[start:stop], out=buffer[: stop - start])
        torch.sum(product, dim=2, out=out[start:stop])
    return out


def weight_grad_from_outputs(z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``z`` ([B, F * dim], output of lookups weighted by :func:`lookup_weight_table`; not modified) with
    ``alpha`` [B, F] tied into the graph; see :class:`_WeightGradFromOutputs`."""
    if z.dim() != 2 or alpha.dim() != 2 or z.shape[0] != alpha.shape[0] or z.shape[1] % max(1, alpha.shape[1]):
        raise ValueError(f"weight_grad_from_outputs: output {tuple(z.shape)} does not fit alpha {tuple(alpha.shape)}")
    return _WeightGradFromOutputs.apply(z, alpha)


def key_order(keys: Sequence[str], feature_index: Dict[str, int], device: torch.device,
              cache: Dict[object, torch.Tensor]) -> Optional[torch.Tensor]:
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
