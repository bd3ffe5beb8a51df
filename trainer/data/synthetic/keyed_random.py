"""Deterministic, vectorised hashing used by the generator.

``token_of`` defines the raw 32-bit token (8 hex digits in the TSV) of a contiguous id; it is part of the
on-disk format, so its values are pinned by golden tests. The other helpers derive per-id pseudo-random
numbers (instance latents, biases, favourites) without storing per-instance tables.
"""

from __future__ import annotations

import numpy as np

from .field_layout import CAT_FIELDS

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def _fmix32_py(h: int) -> int:
    """murmur3 32-bit finaliser on a Python int (bijective on uint32, fmix32(0) == 0)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3 32-bit finaliser on a uint32 array (wraps modulo 2**32)."""
    h = np.array(x, dtype=np.uint32, ndmin=1)  # arrays, not scalars: wrap silently
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h.reshape(np.shape(x))


def field_index(field: int | str) -> int:
    """0-based categorical field index from ``3`` / ``"C4"`` style names (``"C1"`` -> 0)."""
    if isinstance(field, str):
        if field not in CAT_FIELDS:
            raise ValueError(f"unknown categorical field {field!r}; expected one of C1..C26")
        return CAT_FIELDS.index(field)
    if not 0 <= int(field) < len(CAT_FIELDS):
        raise ValueError(f"categorical field index {field!r} out of range [0, {len(CAT_FIELDS)})")
    return int(field)


def token_of(field: int | str, ids: np.ndarray | int) -> np.ndarray:
    """Raw 32-bit token of contiguous ids of one field (written as ``%08x`` in the TSV).

    ``token = fmix32(id ^ k_f) ^ fmix32(k_f)`` with a per-field key ``k_f``: a bijection of uint32 for each
    field, different between fields, and ``token_of(f, 0) == 0`` -- id 0 is "missing", written as an empty
    TSV field, which TorchRec's ``tsv_to_npys`` reads as ``int("" or "0", 16) == 0``.
    """
    f = field_index(field)
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() > _MASK32):
        raise ValueError("token_of: ids must lie in [0, 2**32)")
    key = _fmix32_py((f + 1) * 0x9E3779B9) or 1
    x = arr.astype(np.uint32) ^ np.uint32(key)
    return _fmix32(x) ^ np.uint32(_fmix32_py(key))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array."""
    z = np.array(x, dtype=np.uint64, ndmin=1)  # arrays, not scalars: wrap silently
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z.reshape(np.shape(x))


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, tags, indices) by chained splitmix64."""
    acc = 0x243F6A8885A308D3
    for p in parts:
        acc = int(mix64(np.array([(acc ^ (int(p) & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return acc


def hash_u64(key: int, ids: np.ndarray) -> np.ndarray:
    """64-bit hash of non-negative integer ids under ``key``."""
    x = np.asarray(ids).astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
    return mix64(x ^ np.uint64(key & _MASK64))


def hash_uniform(key: int, ids: np.ndarray) -> np.ndarray:
    """Uniform(0, 1) float64 per id, strictly inside the interval."""
    return ((hash_u64(key, ids) >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def hash_normal(key: int, ids: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Standard normal(s) per id (Box-Muller on two hashed uniforms); shape ids.shape (+ (dim,))."""
    ids = np.asarray(ids).astype(np.uint64)
    if dim is not None:
        ids = ids[..., None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    u1 = hash_uniform(key, ids)
    u2 = hash_uniform(key ^ 0x5851F42D4C957F2D, ids)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
