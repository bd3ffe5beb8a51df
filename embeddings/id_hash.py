"""The salted id hash every hashed method runs, on the backend its options name: ``torch`` (the int64 tensor ops
of :mod:`embeddings.hashing`) or ``fused`` (the registered operator ``compactrec::salted_hash`` of
:mod:`embeddings.ops.salted_hash`); both give the same bits."""

from __future__ import annotations

from typing import Optional

import torch

from embeddings.hashing import HASH_BACKENDS, mix64, unsigned_mod
from embeddings.ops import salted_hash as fused_hash


def salted_hash(
    values: torch.Tensor,
    feature: torch.Tensor,
    salts: torch.Tensor,
    num_buckets: Optional[int] = None,
    rows: Optional[torch.Tensor] = None,
    wrap: Optional[torch.Tensor] = None,
    backend: str = "torch",
) -> torch.Tensor:
    """The salted id hash every hashed method runs: ``mix64(values ^ salts[feature])``, optionally read as
    unsigned and reduced mod ``num_buckets`` (one int) or mod ``rows[feature]`` (per-feature moduli
    ``rows`` [F] in [1, 2**62], with ``wrap = 2**64 mod rows``, see ``embeddings.remap.wrap_of``).

    ``salts`` is [F] (one salt per feature: result [N]) or [F, H] (H salts per feature: result [N, H]);
    ``feature`` [N] is each value's feature index. ``backend="fused"`` calls the registered operator
    ``compactrec::salted_hash`` (``embeddings.ops.salted_hash``: one C++ pass on CPU where it builds, these torch
    ops elsewhere); both backends give the same bits.
    """
    if num_buckets is not None and rows is not None:
        raise ValueError("give num_buckets or rows, not both")
    if backend == "fused":
        out = fused_hash.salted_hash(values, feature, salts, num_buckets if rows is None else rows)
        return out.view(-1) if salts.dim() == 1 else out
    if backend != "torch":
        raise ValueError(f"hash backend must be one of {HASH_BACKENDS}, got {backend!r}")
    ids = values if salts.dim() == 1 else values[:, None]
    h = mix64(ids ^ salts[feature])
    if num_buckets is not None:
        return unsigned_mod(h, num_buckets)
    if rows is not None:
        if wrap is None:
            raise ValueError("rows needs wrap = 2**64 mod rows")
        n, w = rows[feature], wrap[feature]
        if salts.dim() == 2:
            n, w = n[:, None], w[:, None]
        r = torch.remainder(h, n)
        return torch.where(h < 0, torch.remainder(r + w, n), r)
    return h
