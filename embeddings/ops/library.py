"""The C++ library of CompactRec's operators (namespace ``compactrec``): one extension built from every source in
``embeddings/ops/csrc`` with torch's C++-extension tooling (``torch.utils.cpp_extension``, ninja) at first use into
a per-user cache (``$COMPACTREC_KERNEL_CACHE``, default ``~/.cache/compactrec/kernels``; the directory name carries a
hash of the sources, the flags and the torch version; torch's build lock makes concurrent ranks safe).

:func:`ensure_library` loads it once per process and returns whether it loaded. Where it cannot be built (no
compiler or ninja, a failed build; logged once as a warning) or ``COMPACTREC_FUSED_HASH=0`` / ``COMPACTREC_NATIVE=0``
disables it, the schemas in :data:`SCHEMAS` are defined from Python, so every operator still exists and runs its
torch-ops kernel (each operator module registers that kernel and its fake kernel: ``embeddings.ops.salted_hash``,
``embeddings.ops.chunk_bag``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "compactrec"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "salted_hash.cpp", CSRC / "chunk_bag.cpp"]
HEADERS = [CSRC / "id_maths.h", CSRC / "rounding.h"]
_CFLAGS = ["-O3", "-ffp-contract=off"]  # no fused multiply-add: the torch reference rounds every product
SCHEMAS: Dict[str, str] = {
    "salted_hash": "salted_hash(Tensor values, Tensor? feature, Tensor salts, Tensor? mods=None) -> Tensor",
    "chunk_bag_forward": (
        "chunk_bag_forward(Tensor[] weights, Tensor values, Tensor lengths, Tensor table_of_feature, Tensor? salts, "
        "Tensor? rows, Tensor? addresses, Tensor? hot_keys, Tensor? hot_slots, Tensor? hot_starts, "
        "Tensor? hot_values, Tensor? hot_salts, int hot_shift, Tensor? hot_base, int num_chunks, int pooling) "
        "-> (Tensor, Tensor)"),
    "chunk_bag_backward": (
        "chunk_bag_backward(Tensor(a!)[] weights, Tensor(b!)[] states, Tensor grad_out, Tensor addresses, "
        "Tensor lengths, Tensor table_of_feature, int num_chunks, int pooling, int optimizer, float lr, float eps, "
        "float weight_decay, Tensor(c!)[] scratch, int rounding_seed=0) -> ()"),
    "hot_slots": "hot_slots(Tensor keys, int capacity) -> Tensor",
}

_lock = threading.Lock()
_state: Dict[str, object] = {}  # "native": bool; "lib": the torch.library.Library the Python kernels go into


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACTREC_KERNEL_CACHE") or Path.home() / ".cache" / "compactrec" / "kernels")


def disabled() -> bool:
    return os.environ.get("COMPACTREC_NATIVE", "1") == "0" or os.environ.get("COMPACTREC_FUSED_HASH", "1") == "0"


def _build() -> None:
    """Compile (or reuse the cached build of) the extension and load it; raises when it cannot."""
    from torch.utils import cpp_extension

    text = "\n".join(p.read_text() for p in SOURCES + HEADERS)  # a header change rebuilds too
    tag = hashlib.sha256("\n".join([text, " ".join(_CFLAGS), torch.__version__]).encode()).hexdigest()[:12]
    directory = cache_dir() / f"ops_{tag}"
    directory.mkdir(parents=True, exist_ok=True)
    saved_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the pip package (requirements/common.txt) when no system ninja is on PATH
        import ninja  # noqa: F401 - ImportError propagates to ensure_library, which logs it and falls back

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved_path])
    try:
        cpp_extension.load(name=f"compactrec_ops_{tag}", sources=[str(p) for p in SOURCES], extra_cflags=_CFLAGS, extra_include_paths=[str(CSRC)],
                           build_directory=str(directory), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = saved_path


def ensure_library() -> bool:
    """Load the C++ library (once per process) or define the schemas from Python; True when the C++ kernels run."""
    if "native" in _state:
        return bool(_state["native"])
    with _lock:
        if "native" in _state:
            return bool(_state["native"])
        native = False
        if disabled():
            logger.warning("compactrec operators: C++ kernels disabled (COMPACTREC_NATIVE=0 or COMPACTREC_FUSED_HASH=0); "
                           "every operator runs its torch ops")
        else:
            try:
                _build()
                native = True
                logger.info("compactrec operators: C++ kernels loaded (cache %s)", cache_dir())
            except Exception as exc:  # no compiler/ninja, failed build, unwritable cache: the torch kernels run
                message = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else ""
                logger.warning("compactrec operators: C++ kernels unavailable (%s: %s); falling back to their torch "
                               "ops", type(exc).__name__, message)
        if native:
            lib = torch.library.Library(NAMESPACE, "IMPL")  # the schemas and CPU kernels come from C++
        else:
            lib = torch.library.Library(NAMESPACE, "FRAGMENT")
            for schema in SCHEMAS.values():
                lib.define(schema)
        _state["lib"] = lib
        _state["native"] = native
    return native


def library() -> torch.library.Library:
    """The Library object Python kernels are registered into (after :func:`ensure_library`)."""
    ensure_library()
    return _state["lib"]  # type: ignore[return-value]


def registered_schemas() -> List[str]:
    """The schemas as the dispatcher holds them (for the test that C++ and :data:`SCHEMAS` agree)."""
    ensure_library()
    return [str(getattr(torch.ops.compactrec, name).default._schema) for name in SCHEMAS]


__all__ = ["NAMESPACE", "SCHEMAS", "cache_dir", "ensure_library", "library", "registered_schemas"]
