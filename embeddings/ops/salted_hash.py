"""The salted id hash of ``embeddings.hashing`` as a registered torch operator, ``compactrec::salted_hash``.

The torch path hashes ids in about ten int64 elementwise passes (``^``, shifts, masks, ``*``, ``remainder``,
``where``), each allocating a new tensor. The operator does the same maths in one pass over the ids, bit for
bit::

    salted_hash(values [N], feature [N] or None, salts [F, H], mods None | [1] | [F]) -> [N, H] int64
    out[i, j] = mix64(values[i] ^ salts[feature[i], j])                  (mods is None)
    out[i, j] = unsigned(mix64(values[i] ^ salts[feature[i], j])) % m     (m = mods[0] or mods[feature[i]])

i.e. ``unsigned_mod(mix64(values[:, None] ^ salts[feature]), m)`` of ``embeddings.hashing``.

Kernels of the operator:

- CPU: C++ (``embeddings/ops/csrc/salted_hash.cpp``), in the extension :mod:`embeddings.ops.library` builds at
  first use into a per-user cache, split over torch's intra-op threads (``at::parallel_for``).
- every other device (CUDA), and CPU when the C++ kernel cannot be built (no compiler or ninja, a failed
  build; logged once as a warning) or ``COMPACTREC_FUSED_HASH=0``: the torch ops of ``embeddings.hashing``,
  registered for the same operator, so a model that calls it runs (and scripts, and exports) anywhere.
- fake (meta) kernel: shapes only, for ``torch.export`` and planning on ``meta``.

:func:`ensure_op` registers the operator once per process; a scripted or exported model that calls
``torch.ops.compactrec.salted_hash`` needs it called before loading (``trainer.serve.artifact.load`` does).
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional, Tuple, Union

import torch

from embeddings.hashing import MAX_BUCKETS, mix64
from embeddings.ops import library

logger = logging.getLogger(__name__)

OP_NAMESPACE = library.NAMESPACE
OP_NAME = "salted_hash"
SCHEMA = library.SCHEMAS[OP_NAME]

_lock = threading.Lock()
_state: Dict[str, object] = {}  # "native": bool once the Python kernels are registered
_warned_devices: set = set()
cache_dir = library.cache_dir


def _torch_kernel(values: torch.Tensor, feature: Optional[torch.Tensor], salts: torch.Tensor,
                  mods: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The operator in torch ops (any device): the same bits as the C++ kernel."""
    if values.device.type != "cpu" and values.device.type not in _warned_devices:
        _warned_devices.add(values.device.type)
        logger.info("compactrec::salted_hash: no native %s kernel; running its torch ops there", values.device.type)
    if mods is not None and mods.numel() not in (1, salts.shape[0]):
        raise ValueError(f"compactrec::salted_hash: mods must hold 1 or F = {salts.shape[0]} moduli, got "
                         f"{mods.numel()}")
    f = feature if feature is not None else torch.zeros_like(values)
    h = mix64(values[:, None] ^ salts[f])
    if mods is None:
        return h
    n = (mods if mods.numel() > 1 else mods.expand(salts.shape[0]))[f][:, None]
    # 2**64 mod n without leaving int64: ((2**63 - 1) mod n + 1) mod n is 2**63 mod n (< n <= 2**62), doubled
    half = torch.remainder(torch.remainder(torch.full_like(n, (1 << 63) - 1), n) + 1, n)
    wrap = torch.remainder(2 * half, n)
    r = torch.remainder(h, n)
    return torch.where(h < 0, torch.remainder(r + wrap, n), r)


def _fake_kernel(values: torch.Tensor, feature: Optional[torch.Tensor], salts: torch.Tensor,
                 mods: Optional[torch.Tensor] = None) -> torch.Tensor:
    return values.new_empty((values.shape[0], salts.shape[1]))


def ensure_op() -> bool:
    """Register ``compactrec::salted_hash`` in this process (once); True when the C++ CPU kernel is in use."""
    if "native" in _state:
        return bool(_state["native"])
    with _lock:
        if "native" in _state:
            return bool(_state["native"])
        native = library.ensure_library()
        lib = library.library()
        lib.impl(OP_NAME, _torch_kernel, "CompositeExplicitAutograd")  # CUDA etc. (and CPU without C++)
        torch.library.register_fake(f"{OP_NAMESPACE}::{OP_NAME}", _fake_kernel, lib=lib)
        _state["native"] = native
    return native


def available() -> bool:
    """Whether the C++ CPU kernel runs in this process (builds it on first call)."""
    return ensure_op()


_mod_cache: Dict[Tuple[int, str], torch.Tensor] = {}


def salted_hash(values: torch.Tensor, feature: Optional[torch.Tensor], salts: torch.Tensor,
                mods: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
    """``[N, H]`` int64 hashes of ``values`` [N] with salt rows ``salts[feature]`` ([F, H] or [F]), reduced
    (unsigned) mod ``mods`` (an int, or [F] per-feature moduli in [1, 2**62]) unless it is ``None``."""
    ensure_op()
    salts2 = salts.to(torch.int64).reshape(salts.shape[0], -1)
    mod_t: Optional[torch.Tensor] = None
    if isinstance(mods, torch.Tensor):
        mod_t = mods.to(dtype=torch.int64)
    elif mods is not None:
        if not 1 <= int(mods) <= MAX_BUCKETS:
            raise ValueError(f"num_buckets must be in [1, 2**62], got {mods}")
        key = (int(mods), str(values.device))
        mod_t = _mod_cache.get(key)
        if mod_t is None:
            mod_t = torch.tensor([int(mods)], dtype=torch.int64, device=values.device)
            if len(_mod_cache) < 1024:
                _mod_cache[key] = mod_t
    return torch.ops.compactrec.salted_hash(values.to(torch.int64).reshape(-1),
                                            None if feature is None else feature.to(torch.int64), salts2, mod_t)


__all__ = ["SCHEMA", "available", "cache_dir", "ensure_op", "salted_hash"]
