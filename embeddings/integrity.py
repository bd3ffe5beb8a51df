"""sha256 checksums of the arrays of an ``.npz`` artifact (the LMA index, the id counts), written into its JSON
header at save and compared at load, so a file damaged on disk (a flipped byte that still parses) is an error
naming the file instead of silently different training."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import numpy as np


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    h.update(a.tobytes())
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
