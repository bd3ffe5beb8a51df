"""The salted id hash of ``embeddings.hashing`` as a registered torch operator, ``compactrec::salted_hash``.

The torch path hashes ids in about ten int64 elementwise passes (``^``, shifts, masks, ``*``, ``remainder``,
``where``), each allocating a new tensor. The operator does the same maths in one pass over the ids, bit for
bit::

    salted_hash(values [N], feature [N] or None, salts [F, H], mods None | [1] | [F]) -> [N, H] int64
    out[i, j] = mix64(values[i] ^ salts[feature[i], j])                  (mods is None)
    out[i, j] = unsigned(mix64(values[i] ^ salts[feature[i], j])) % m     (m = mods[0] or mods[feature[i]])

i.e. ``unsigned_mod(mix64(values[:, None] ^ salts[feature]), m)`` of ``embeddings.hashing``.

Kernels of the operator:

- CPU: C++ (``embeddings/ops/csrc/salted_hash.cpp``, ``TORCH_LIBRARY``), compiled with torch's C++-extension
  tooling (``torch.utils.cpp_extension``, ninja) at first use into a per-user cache
  (``$COMPACTREC_KERNEL_CACHE``, default ``~/.cache/compactrec/kernels``; the directory name carries a hash of
  the source, the flags and the torch version; torch's build lock makes concurrent ranks safe), split over
  torch's intra-op threads (``at::parallel_for``).
- every other device (CUDA), and CPU when the C++ kernel cannot be built (no compiler or ninja, a failed
  build; logged once as a warning) or ``COMPACTREC_FUSED_HASH=0``: the torch ops of ``embeddings.hashing``,
  registered for the same operator, so a model that calls it runs (and scripts, and exports) anywhere.
- fake (meta) kernel: shapes only, for ``torch.export`` and planning on ``meta``.

:func:`ensure_op` registers the operator once per process; a scripted or exported model that calls
``torch.ops.compactrec.salted_hash`` needs it called before loading (``trainer.serve.artifact.load`` does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from embeddings.hashing import MAX_BUCKETS, mix64

logger = logging.getLogger(__name__)

OP_NAMESPACE = "compactrec"
OP_NAME = "salted_hash"
SCHEMA = "salted_hash(Tensor values, Tensor? feature, Tensor salts, Tensor? mods=None) -> Tensor"
SOURCE = Path(__file__).resolve().parent / "csrc" / "salted_hash.cpp"
_CFLAGS = ["-O3"]

_lock = threading.Lock()
_state: Dict[str, object] = {}  # "native": bool once registered; "libs": torch.library.Library objects kept alive
_warned_devices: set = set()


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACTREC_KERNEL_CACHE") or Path.home() / ".cache" / "compactrec" / "kernels")


def _build_native() -> None:
    """Compile (or reuse the cached build of) the C++ operator and load it; raises when it cannot."""
    from torch.utils import cpp_extension

    source = SOURCE.read_text()
    tag = hashlib.sha256("\n".join([source, " ".join(_CFLAGS), torch.__version__]).encode()).hexdigest()[:12]
    directory = cache_dir() / f"salted_hash_{tag}"
    directory.mkdir(parents=True, exist_ok=True)
    saved_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the pip package (requirements/common.txt) when no system ninja is on PATH
        import ninja  # noqa: F401 - ImportError propagates to ensure_op, which logs it and falls back

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved_path])
    try:
        cpp_extension.load(name=f"compactrec_salted_hash_{tag}", sources=[str(SOURCE)], extra_cflags=_CFLAGS,
                           build_directory=str(directory), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = saved_path


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
        native = False
        if os.environ.get("COMPACTREC_FUSED_HASH", "1") == "0":
            logger.warning("compactrec::salted_hash: C++ kernel disabled by COMPACTREC_FUSED_HASH=0; "
                           "using its torch ops")
        else:
            try:
                _build_native()
                native = True
                logger.info("compactrec::salted_hash: C++ kernel loaded (cache %s)", cache_dir())
            except Exception as exc:  # no compiler/ninja, failed build, unwritable cache: the torch kernel runs
                logger.warning("compactrec::salted_hash: C++ kernel unavailable (%s: %s); falling back to the "
                               "torch ops", type(exc).__name__, str(exc).strip().splitlines()[-1][:500] if str(exc)
                               else "")
        if native:
            lib = torch.library.Library(OP_NAMESPACE, "IMPL")  # the schema and CPU kernel come from C++
        else:
            lib = torch.library.Library(OP_NAMESPACE, "DEF")
            lib.define(SCHEMA)
        lib.impl(OP_NAME, _torch_kernel, "CompositeExplicitAutograd")  # CUDA etc. (and CPU without C++)
        torch.library.register_fake(f"{OP_NAMESPACE}::{OP_NAME}", _fake_kernel, lib=lib)
        _state["libs"] = lib
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
