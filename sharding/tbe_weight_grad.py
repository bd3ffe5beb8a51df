"""Weighted TBE lookups without fbgemm's per-lookup weight gradient, for the lookups a module chooses.

fbgemm's table-batched kernels (``SplitTableBatchedEmbeddingBagsCodegen``, ``DenseTableBatchedEmbeddingBagsCodegen``)
compute the gradient of every lookup's weight whenever a lookup is weighted, unless their ``forward`` gets
``feature_requires_grad`` with zeros; TorchRec's sharded lookups never pass it. :class:`WeightGradSwitch` wraps
the ``forward`` of the TBE kernels inside one module (instance attributes; nothing global is patched) so that
inside ``with switch.without_weight_grad():`` every weighted lookup runs with ``feature_requires_grad = 0``.
Outside that block the kernels are called exactly as before.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    DenseTableBatchedEmbeddingBagsCodegen,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn

TBE_TYPES = (SplitTableBatchedEmbeddingBagsCodegen, DenseTableBatchedEmbeddingBagsCodegen)


class WeightGradSwitch:
    """Turns the per-lookup weight gradient of every TBE kernel under ``roots`` off inside a ``with`` block."""

    def __init__(self, roots: Iterable[nn.Module]) -> None:
        self._active = False
        self._zeros: Dict[int, torch.Tensor] = {}
        self.kernels: List[nn.Module] = [m for root in roots for m in root.modules() if isinstance(m, TBE_TYPES)]
        for kernel in self.kernels:
            kernel.forward = self._wrap(kernel, kernel.forward)  # type: ignore[method-assign]

    def _wrap(self, kernel: nn.Module, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        d_offsets = kernel.get_buffer("D_offsets")  # [features + 1] of both TBE kinds
        num_features = int(d_offsets.numel()) - 1

        def wrapped(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Any = None,
                    *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._active and per_sample_weights is not None and not args and \
                    kwargs.get("feature_requires_grad") is None:
                kwargs["feature_requires_grad"] = self._zeros_for(id(kernel), num_features, indices.device)
            return forward(indices, offsets, per_sample_weights, *args, **kwargs)

        return wrapped

    def _zeros_for(self, key: int, num_features: int, device: torch.device) -> torch.Tensor:
        zeros = self._zeros.get(key)
        if zeros is None or zeros.device != device:
            zeros = torch.zeros(num_features, dtype=torch.int32, device=device)
            self._zeros[key] = zeros
        return zeros

    @contextlib.contextmanager
    def without_weight_grad(self) -> Iterator[None]:
        """Weighted lookups in this block give their weights no gradient (the caller supplies it)."""
        previous, self._active = self._active, True
        try:
            yield
        finally:
            self._active = previous


def sharded_ebc_lookups(ebc: nn.Module) -> List[nn.Module]:
    """The lookup modules of a TorchRec ``ShardedEmbeddingBagCollection`` (they hold its TBE kernels).

    torchrec 1.8 keeps them in the plain list ``_lookups`` (not registered as submodules); an EBC without it is
    an error here rather than a switch that silently wraps nothing."""
    lookups = getattr(ebc, "_lookups", None)
    if not isinstance(lookups, list) or not all(isinstance(m, nn.Module) for m in lookups):
        raise TypeError(f"{type(ebc).__name__} has no list of lookup modules `_lookups` (torchrec layout changed?)")
    return lookups
