"""sha256 checksums of what CompactRec writes: the arrays of an ``.npz`` artifact (the LMA index, the id counts,
recorded in its JSON header), tensors (inference artifacts) and files (checkpoints); written at save and compared
at load, so a file damaged on disk (a flipped byte that still parses) is an error naming the file instead of
silently different numbers."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, element count and bytes (any dtype, bf16 included)."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}{t.numel()}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checksums(arrays: Mapping[str, np.ndarray]) -> Dict[str, str]:
    return {name: array_sha256(a) for name, a in arrays.items()}


def read_verified(archive: Any, name: str, recorded: Mapping[str, str], path: str | Path, what: str,
                  rebuild: str) -> np.ndarray:
    """Array ``name`` of an open npz ``archive``, compared with its recorded sha256 (a ValueError naming the
    file and the rebuild command when it differs or cannot be read)."""
    damaged: Callable[[str], ValueError] = lambda why: ValueError(  # noqa: E731
        f"{path}: {what} is damaged ({why}); re-run `{rebuild}` to rebuild it")
    if name not in recorded:
        raise damaged(f"its header records no sha256 of array {name!r}")
    try:
        array: np.ndarray = archive[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise damaged(f"array {name!r} is unreadable: {exc}") from exc
    actual = array_sha256(array)
    if actual != recorded[name]:
        raise damaged(f"array {name!r} has sha256 {actual[:16]}..., the header records {str(recorded[name])[:16]}...")
    return array
