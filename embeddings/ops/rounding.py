"""Stochastic rounding of updated table rows to fp16 / bf16, in torch ops, bit for bit the C++ kernel's
(``embeddings/ops/csrc/rounding.h``), and the float32 row update both kernels round.

A value ``x`` between the two neighbouring fp16 values ``lo < x < lo + s`` becomes ``lo + s`` with probability
``(x - lo) / s`` and ``lo`` otherwise, so the stored value is ``x`` in expectation: an update smaller than half an fp16
step still moves the row on average, where round-to-nearest would drop it every time. The random number of element
``j`` of row ``r`` of table ``t`` (``Z`` columns) in the backward call with ``seed`` is counter-based, not drawn from
a generator state::

    u = (mix64(mix64(mix64(seed) ^ t) ^ (r * Z + j)) >>> 40) / 2**24        (embeddings.hashing.mix64)

so a run is reproducible and the torch reference gives the C++ kernel's exact bits. fp16: ``s = 2**(max(e, -14) -
10)`` for ``e = floor(log2 |x|)`` (the subnormal spacing below 2**-14), ``|x| / s``, its floor and fraction are exact in
float32; the result saturates at 65504. bf16: the float32 bits of ``|x|`` plus 16 random bits, truncated. The sign
is ``x``'s; inf and NaN pass through. The unbiasedness is exact for fp16 normals and bf16 (the fraction is a multiple
of 2**-13 / 2**-16), and within 2**-24 of a step for fp16 subnormals.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from embeddings.hashing import logical_right_shift, mix64

ROUNDED = (torch.float16, torch.bfloat16)


def rounding_uniform(seed: int, table: int, elements: torch.Tensor) -> torch.Tensor:
    """The 24-bit random integers (int64) of ``elements`` (``r * Z + j``) of ``table`` in the call with ``seed``."""
    stream = mix64(mix64(torch.tensor(int(seed), dtype=torch.int64, device=elements.device)) ^ int(table))
    return logical_right_shift(mix64(stream ^ elements.to(torch.int64)), 40) & 0xFFFFFF


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, u24: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to ``dtype`` (fp16 or bf16) with the 24-bit random integers ``u24`` (same shape)."""
    x = x.to(torch.float32)
    bits = x.view(torch.int32)
    if dtype == torch.bfloat16:
        mag = ((bits & 0x7FFFFFFF) + (u24 >> 8).to(torch.int32)) & -65536  # -65536 = 0xFFFF0000 as int32
        mag = torch.clamp(mag, max=0x7F7F0000)
        out = (mag | (bits & -2147483648)).view(torch.float32)  # exactly a bf16 value
    elif dtype == torch.float16:
        e = torch.clamp(((bits >> 23) & 0xFF) - 127, min=-14)
        spacing = ((e - 10 + 127) << 23).view(torch.float32)
        q = x.abs() / spacing
        lo = torch.floor(q)
        up = (u24.to(torch.float32) * 2.0 ** -24 < q - lo).to(torch.float32)
        out = torch.copysign(torch.clamp((lo + up) * spacing, max=65504.0), x)
    else:
        raise ValueError(f"stochastic rounding goes to float16 or bfloat16, not {dtype}")
    return torch.where(torch.isfinite(x), out, x).to(dtype)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (the kernel's std::sqrt; torch's vectorised float32 sqrt is not):
    in float64, then rounded once to float32, which is exact for a square root."""
    return x.to(torch.float64).sqrt().to(torch.float32)


def update_rows(w: torch.Tensor, state: Optional[torch.Tensor], unique: torch.Tensor, summed: torch.Tensor,
                optimizer: int, lr: float, eps: float, weight_decay: float, seed: int, table: int) -> None:
    """One fused update of rows ``unique`` of ``w`` with their summed float32 gradient, op for op the C++ kernel
    (float32 arithmetic, every product rounded, the row's sum of squares in column order); fp16 / bf16 tables store
    the result stochastically rounded."""
    current = w[unique].to(torch.float32)
    if weight_decay and optimizer >= 2:
        summed = summed + weight_decay * current
    if optimizer == 1:
        new = current - lr * summed
    elif optimizer == 2:
        assert state is not None
        m = state.view(w.shape)
        m[unique] = m[unique] + summed * summed
        new = current - lr * summed / (_sqrt(m[unique]) + eps)
    else:
        assert state is not None
        m = state.view(-1)
        square = torch.zeros(unique.numel(), dtype=torch.float32, device=w.device)
        for j in range(w.shape[1]):
            square = square + summed[:, j] * summed[:, j]
        m[unique] = m[unique] + square / w.shape[1]
        denom = _sqrt(m[unique]) + eps
        new = current - (torch.full_like(denom, lr) / denom)[:, None] * summed
    if w.dtype in ROUNDED:
        columns = torch.arange(w.shape[1], dtype=torch.int64, device=w.device)
        u24 = rounding_uniform(seed, table, unique[:, None] * w.shape[1] + columns[None, :])
        w[unique] = stochastic_round(new, w.dtype, u24)
    else:
        w[unique] = new.to(w.dtype)


__all__: List[str] = ["ROUNDED", "rounding_uniform", "stochastic_round", "update_rows"]
