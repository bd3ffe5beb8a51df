"""Optional fused CPU kernel for the salted id hash of ``embeddings.hashing`` (``hash_backend: fused``).

The torch path hashes ids in about ten int64 elementwise passes (``^``, shifts, masks, ``*``, ``remainder``,
``where``), each allocating a new tensor. This module does the same maths in one pass of plain C over the
ids, bit for bit::

    out[i, j] = mix64(values[i] ^ salts[feature[i], j])                  (mods is None)
    out[i, j] = unsigned(mix64(values[i] ^ salts[feature[i], j])) % m     (m = mods[0] or mods[feature[i]])

which is ``unsigned_mod(mix64(values[:, None] ^ salts[feature]), m)`` / ``unsigned_mod_rows`` of the torch
path (see ``embeddings.hashing``). The modulus is exact (a 128-bit multiply-high estimate of the quotient
followed by two branch-free corrections, no hardware divide).

The C source is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into a
per-user cache (``$COMPACTREC_KERNEL_CACHE``, default ``~/.cache/compactrec/kernels``; the file name carries a
hash of the source and flags, written through an atomic rename so concurrent ranks are safe) and loaded with
``ctypes`` - no torch headers, so it builds in about a second. It is an *accelerated path only*:
:func:`salted_hash` returns ``None`` whenever the kernel cannot be used - no compiler or a failed build
(logged once, as a warning), tensors not on the CPU (CUDA: logged once; the torch path runs there), meta
tensors (planning) - and the caller then runs the torch path. ``COMPACTREC_FUSED_HASH=0`` disables it.

The kernel is single-threaded for small inputs and splits large ones over ``torch.get_num_threads()``
threads (the work is independent per id; ``ctypes`` releases the GIL during each call).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "fused")

_SOURCE = r"""
#include <stdint.h>

static inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* x mod n for 1 <= n: q = mulhi(x, floor((2^64 - 1) / n)) underestimates floor(x / n) by at most 2, so
   r = x - q n is in [0, 3n); two branch-free corrections (the branch would be unpredictable). */
static inline uint64_t umod(uint64_t x, uint64_t n, uint64_t inv) {
    uint64_t q = (uint64_t)(((unsigned __int128)x * inv) >> 64);
    uint64_t r = x - q * n;
    r -= (r >= n) ? n : 0;
    r -= (r >= n) ? n : 0;
    return r;
}

/* values [n]; feature [n] or NULL (all feature 0); salts [num_features, h]; mods NULL (no reduction),
   or [1] (mod_per_feature = 0) or [num_features] (mod_per_feature = 1); out [n, h]. Rows begin..end. */
void compactrec_salted_hash(const int64_t *values, const int64_t *feature, const int64_t *salts, int64_t h,
                            const int64_t *mods, const uint64_t *invs, int64_t mod_per_feature,
                            int64_t begin, int64_t end, int64_t *out) {
    if (!mods) {
        for (int64_t i = begin; i < end; ++i) {
            const uint64_t x = (uint64_t)values[i];
            const int64_t *s = salts + (feature ? feature[i] : 0) * h;
            for (int64_t j = 0; j < h; ++j) out[i * h + j] = (int64_t)mix64(x ^ (uint64_t)s[j]);
        }
    } else if (!mod_per_feature) {
        const uint64_t n = (uint64_t)mods[0], inv = invs[0];
        for (int64_t i = begin; i < end; ++i) {
            const uint64_t x = (uint64_t)values[i];
            const int64_t *s = salts + (feature ? feature[i] : 0) * h;
            for (int64_t j = 0; j < h; ++j) out[i * h + j] = (int64_t)umod(mix64(x ^ (uint64_t)s[j]), n, inv);
        }
    } else {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t f = feature ? feature[i] : 0;
            const uint64_t x = (uint64_t)values[i], n = (uint64_t)mods[f], inv = invs[f];
            const int64_t *s = salts + f * h;
            for (int64_t j = 0; j < h; ++j) out[i * h + j] = (int64_t)umod(mix64(x ^ (uint64_t)s[j]), n, inv);
        }
    }
}
"""
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]
_PARALLEL_MIN_IDS = 1 << 15  # below this, one thread (thread hand-off costs ~20-50 us)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_load_failed = False
_warned_devices: set = set()
_pool: Optional[ThreadPoolExecutor] = None


def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACTREC_KERNEL_CACHE") or Path.home() / ".cache" / "compactrec" / "kernels")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    tag = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    lib_path = directory / f"compactrec_hash_{tag}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = Path(tmp) / "hash.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "hash.so"
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")
            os.replace(out, lib_path)  # atomic: a concurrent rank sees the old state or the whole file
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.compactrec_salted_hash
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, building it on first call; ``None`` (logged once) if it cannot be built."""
    global _lib, _load_failed
    if _lib is not None or _load_failed:
        return _lib
    with _lock:
        if _lib is None and not _load_failed:
            if os.environ.get("COMPACTREC_FUSED_HASH", "1") == "0":
                _load_failed = True
                logger.warning("fused id hashing disabled by COMPACTREC_FUSED_HASH=0; using the torch ops")
                return None
            try:
                _lib = _build()
                logger.info("fused id hashing: C kernel loaded (cache %s)", cache_dir())
            except Exception as exc:  # no compiler, failed build, unwritable cache, ...: the torch path runs
                _load_failed = True
                logger.warning("fused id hashing unavailable (%s); falling back to the torch ops", exc)
    return _lib


def reset() -> None:
    """Forget the loaded kernel and any failure (tests; the next call builds or loads again)."""
    global _lib, _load_failed
    with _lock:
        _lib, _load_failed = None, False
        _warned_devices.clear()


def available() -> bool:
    """Whether the CPU kernel can be used in this process (builds it if needed)."""
    return load() is not None


def _inverses(mods: torch.Tensor) -> torch.Tensor:
    """floor((2**64 - 1) / n) of each modulus as uint64 bits in an int64 tensor."""
    return torch.tensor([_signed(((1 << 64) - 1) // int(n)) for n in mods.tolist()], dtype=torch.int64)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


_inverse_cache: dict = {}


def salted_hash(values: torch.Tensor, feature: Optional[torch.Tensor], salts: torch.Tensor,
                mods: Union[None, int, torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``[N, H]`` int64 hashes of ``values`` [N] with salt rows ``salts[feature]`` ([F, H] or [F]), reduced
    (unsigned) mod ``mods`` (an int, or [F] per-feature moduli in [1, 2**62]) unless it is ``None``.

    Returns ``None`` when the fused kernel cannot run (not CPU, meta, no compiler); the caller then runs
    the torch path, which gives the same bits.
    """
    if values.device.type != "cpu":
        if values.device.type != "meta" and values.device.type not in _warned_devices:
            _warned_devices.add(values.device.type)
            logger.info("fused id hashing is CPU-only; using the torch ops on %s", values.device.type)
        return None
    lib = load()
    if lib is None:
        return None
    values = values.to(torch.int64).contiguous()
    n = values.numel()
    salts2 = salts.to(torch.int64).reshape(salts.shape[0], -1).contiguous()
    h = salts2.shape[1]
    if feature is not None:
        feature = feature.to(torch.int64).contiguous()
    mod_t: Optional[torch.Tensor] = None
    inv_t: Optional[torch.Tensor] = None
    per_feature = 0
    if mods is not None:
        if isinstance(mods, torch.Tensor):
            mod_t = mods.to(device="cpu", dtype=torch.int64).contiguous()
            per_feature = 1
        else:
            mod_t = torch.tensor([int(mods)], dtype=torch.int64)
        key = tuple(mod_t.tolist())
        inv_t = _inverse_cache.get(key)
        if inv_t is None:
            inv_t = _inverses(mod_t)
            if len(_inverse_cache) < 1024:
                _inverse_cache[key] = inv_t
    out = torch.empty(n, h, dtype=torch.int64)
    if n == 0:
        return out
    args = (values.data_ptr(), feature.data_ptr() if feature is not None else None, salts2.data_ptr(), h,
            mod_t.data_ptr() if mod_t is not None else None, inv_t.data_ptr() if inv_t is not None else None,
            per_feature)
    fn = lib.compactrec_salted_hash
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n * h < _PARALLEL_MIN_IDS:
        fn(*args, 0, n, out.data_ptr())
    else:
        global _pool
        if _pool is None or _pool._max_workers != threads:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compactrec-hash")
        step = (n + threads - 1) // threads
        futures = [_pool.submit(fn, *args, b, min(n, b + step), out.data_ptr()) for b in range(step, n, step)]
        fn(*args, 0, min(n, step), out.data_ptr())
        for fut in futures:
            fut.result()
    return out
