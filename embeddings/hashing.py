"""Deterministic 64-bit hashing of raw ids, done with int64 tensor ops only.

Every function here is pure and gives the same bits on CPU and CUDA: it uses only wrapping int64
``+``, ``*``, ``^``, ``&`` and shifts (``torch``'s int64 ``>>`` is arithmetic, so a logical right shift
is emulated by masking off the copied sign bits). Any int64 id is accepted, negative ones and ids above
``2**32`` included; all 64 bits of the id take part (no truncation).

Definitions (all arithmetic modulo ``2**64``; ``>>>`` is the logical right shift)::

    mix64(x)   = splitmix64 output function:
                 z = x + 0x9E3779B97F4A7C15
                 z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9
                 z = (z ^ (z >>> 27)) * 0x94D049BB133111EB
                 return z ^ (z >>> 31)
    salt(f, s, k) = mix64(mix64(mix64(s) + f) + k)          # feature index f, seed s, hash index k
    hash64(x, f, s, k) = mix64(x ^ salt(f, s, k))
    hash_to_range(x, f, s, k, n) = hash64(x, f, s, k) read as an unsigned 64-bit integer, mod n

For a fixed (f, s, k), ``x -> hash64`` is a bijection of the 64-bit integers: distinct ids only ever
collide through the final ``mod n``. Callers that need several independent hash families (MEM-REC's
token and weight hashes) give them distinct ``k``.
"""

from __future__ import annotations

from typing import Union

import torch

IntLike = Union[int, torch.Tensor]

_MASK64 = (1 << 64) - 1
MAX_BUCKETS = 1 << 62  # keeps (remainder + 2**64 mod n) below 2**63 in int64


def _signed(value: int) -> int:
    """The int64 whose two's-complement bits equal ``value mod 2**64``."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
MIX_MUL_1 = _signed(0xBF58476D1CE4E5B9)
MIX_MUL_2 = _signed(0x94D049BB133111EB)


def logical_right_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x >>> shift`` on int64 bits (zero fill), for ``0 < shift < 64``."""
    if not 0 < shift < 64:
        raise ValueError(f"shift must be in (0, 64), got {shift}")
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _as_int64(x: IntLike, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"hash inputs must be integer tensors, got dtype {x.dtype}")
        return x.to(torch.int64)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"hash inputs must be ints or integer tensors, got {type(x).__name__}")
    device = like.device if like is not None else None
    return torch.tensor(_signed(x), dtype=torch.int64, device=device)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (see the module docstring)."""
    z = x.to(torch.int64) + GOLDEN_GAMMA
    z = (z ^ logical_right_shift(z, 30)) * MIX_MUL_1
    z = (z ^ logical_right_shift(z, 27)) * MIX_MUL_2
    return z ^ logical_right_shift(z, 31)


def hash_salt(feature: IntLike, seed: IntLike, k: IntLike, device: torch.device | None = None) -> torch.Tensor:
    """``salt(feature, seed, k)``: the per-(feature, seed, hash index) key XORed into the id."""
    anchor = next((t for t in (feature, seed, k) if isinstance(t, torch.Tensor)), None)
    if anchor is None:
        anchor = torch.empty(0, dtype=torch.int64, device=device)
    f, s, kk = (_as_int64(v, anchor) for v in (feature, seed, k))
    return mix64(mix64(mix64(s) + f) + kk)


def hash64(ids: torch.Tensor, feature: IntLike, seed: IntLike, k: IntLike) -> torch.Tensor:
    """64-bit hash of each id (int64 bits); ``feature``, ``seed``, ``k`` broadcast against ``ids``."""
    ids = _as_int64(ids)
    return mix64(ids ^ hash_salt(feature, seed, k, device=ids.device))


def unsigned_mod(h: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``h`` read as an unsigned 64-bit integer, reduced mod ``num_buckets``; int64 in [0, num_buckets)."""
    _check_buckets(num_buckets)
    r = torch.remainder(h, num_buckets)  # in [0, n) for the signed value
    wrap = (1 << 64) % num_buckets  # unsigned value = signed value + 2**64 when h < 0
    return torch.where(h < 0, torch.remainder(r + wrap, num_buckets), r)


def hash_to_range(ids: torch.Tensor, feature: IntLike, seed: IntLike, k: IntLike, num_buckets: int) -> torch.Tensor:
    """Bucket of each id in ``[0, num_buckets)`` under hash function ``k`` of ``(feature, seed)``."""
    return unsigned_mod(hash64(ids, feature, seed, k), num_buckets)


def identity_to_range(ids: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``id mod num_buckets`` (non-negative): the degenerate "hash" that makes compression the identity."""
    _check_buckets(num_buckets)
    return torch.remainder(_as_int64(ids), num_buckets)


def _check_buckets(num_buckets: int) -> None:
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int):
        raise TypeError(f"num_buckets must be an int, got {type(num_buckets).__name__}")
    if not 1 <= num_buckets <= MAX_BUCKETS:
        raise ValueError(f"num_buckets must be in [1, 2**62], got {num_buckets}")


HASH_BACKENDS = ("torch", "fused")
