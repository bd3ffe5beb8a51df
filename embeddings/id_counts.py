"""How often each raw id of each feature occurs in the training split: bounded, deterministic counting.

:class:`FrequencyCounter` keeps, per feature, at most ``capacity`` (value, count) pairs. Ids are buffered and
merged in batches (sort + add, amortised so every id is sorted O(log) times); when a feature holds more than
``capacity`` distinct values, the batched Misra-Gries rule applies: subtract the ``(capacity + 1)``-th largest
count from every count and drop those left at zero or below. Hence, per feature:

- memory is O(capacity + the pending buffer), whatever the data size;
- a value occurring more than ``total / (capacity + 1)`` times is always kept, and every kept count is an
  underestimate by at most ``error_bound`` (the sum of the subtracted thresholds, also <= total / (capacity + 1));
- while nothing was ever dropped (``exact``), the values are exactly the distinct values and the counts exact.

The result does not depend on the order of batches within a merge nor on how the input was cut into calls
(ties are broken by value), so the same data gives the same artifact.

:class:`IdCounts` is the result, saved as one uncompressed ``.npz`` (``numpy.load(path, allow_pickle=False)``):
``header`` (a JSON object: format, version, feature names, capacity, per-feature totals / exact / error bounds,
and ``provenance``: the data fingerprint and the counting options, see ``trainer.prepare.fingerprint``; ``sha256``:
each array's sha256, compared at load, see ``embeddings.integrity``), ``values`` (int64, per feature ascending,
features concatenated), ``counts`` (int64) and ``offsets`` ([F + 1] int64).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from embeddings.integrity import checksums, read_verified

FORMAT = "compactrec-id-counts"
VERSION = 2  # 2: sha256 of the arrays
DEFAULT_CAPACITY = 1 << 24  # values kept per feature (Criteo Kaggle's largest feature has 10.1M)
BUILD_COMMAND = "compactrec prepare CONFIG"


def _merge(values: np.ndarray, counts: np.ndarray, new_values: np.ndarray,
           new_counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Union of two (sorted unique values, counts) lists with counts of equal values added."""
    if values.size == 0:
        return new_values, new_counts
    both = np.concatenate([values, new_values])
    unique, inverse = np.unique(both, return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate([counts, new_counts]).astype(np.float64),
                         minlength=unique.size)
    return unique, np.rint(summed).astype(np.int64)


class FrequencyCounter:
    """Per-feature counts of int64 ids in at most ``capacity`` entries per feature (see the module doc)."""

    def __init__(self, num_features: int, capacity: int = DEFAULT_CAPACITY, min_flush: int = 1 << 20) -> None:
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.min_flush = max(1, int(min_flush))
        self.values = [np.empty(0, np.int64) for _ in range(num_features)]
        self.counts = [np.empty(0, np.int64) for _ in range(num_features)]
        self.totals = [0] * num_features
        self.error = [0] * num_features
        self.exact = [True] * num_features
        self._pending: List[List[np.ndarray]] = [[] for _ in range(num_features)]
        self._pending_size = [0] * num_features

    @property
    def num_features(self) -> int:
        return len(self.values)

    def add(self, feature: int, ids: np.ndarray) -> None:
        """Count ``ids`` (any integer array) as occurrences of values of ``feature``."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size == 0:
            return
        ids = ids.astype(np.int64, copy=False).reshape(-1)
        self.totals[feature] += int(ids.size)
        self._pending[feature].append(ids)
        self._pending_size[feature] += int(ids.size)
        if self._pending_size[feature] >= max(self.min_flush, self.values[feature].size):
            self._flush(feature)

    def _flush(self, feature: int) -> None:
        if not self._pending[feature]:
            return
        chunk = np.concatenate(self._pending[feature])
        self._pending[feature], self._pending_size[feature] = [], 0
        new_values, new_counts = np.unique(chunk, return_counts=True)
        values, counts = _merge(self.values[feature], self.counts[feature], new_values, new_counts.astype(np.int64))
        if values.size > self.capacity:
            # Misra-Gries: subtract the (capacity + 1)-th largest count, keep what stays positive
            threshold = int(np.partition(counts, counts.size - self.capacity - 1)[counts.size - self.capacity - 1])
            counts = counts - threshold
            keep = counts > 0
            values, counts = values[keep], counts[keep]
            self.error[feature] += threshold
            self.exact[feature] = False
        self.values[feature], self.counts[feature] = values, counts

    def result(self, feature_names: Sequence[str], provenance: Optional[Dict[str, Any]] = None) -> "IdCounts":
        names = list(feature_names)
        if len(names) != self.num_features:
            raise ValueError(f"{len(names)} feature names for {self.num_features} counted features")
        for f in range(self.num_features):
            self._flush(f)
        return IdCounts(names, list(self.values), list(self.counts), list(self.totals), list(self.exact),
                        list(self.error), self.capacity, dict(provenance or {}))


@dataclass
class IdCounts:
    """Counted values of every feature (values ascending within a feature), see the module doc."""

    feature_names: List[str]
    values: List[np.ndarray]
    counts: List[np.ndarray]
    totals: List[int]
    exact: List[bool]
    error_bound: List[int]
    capacity: int
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        if not all(len(x) == n for x in (self.values, self.counts, self.totals, self.exact, self.error_bound)):
            raise ValueError("id counts: every per-feature list needs one entry per feature")
        for f, (v, c) in enumerate(zip(self.values, self.counts)):
            if v.dtype != np.int64 or c.dtype != np.int64 or v.shape != c.shape or v.ndim != 1:
                raise ValueError(f"id counts: feature {f}: values and counts must be int64 arrays of one shape")
            if v.size > 1 and not bool(np.all(v[1:] > v[:-1])):
                raise ValueError(f"id counts: feature {f}: values must be strictly increasing")
            if c.size and int(c.min()) <= 0:
                raise ValueError(f"id counts: feature {f}: counts must be positive")

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def distinct(self) -> List[int]:
        """Distinct values kept per feature (the distinct training values where ``exact``)."""
        return [int(v.size) for v in self.values]

    def table_sizes(self) -> List[int]:
        """Rows of a full table giving every counted value its own row plus one row shared by all others."""
        return [n + 1 for n in self.distinct()]

    def ranked(self, min_count: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feature, value, count) of every value with count >= ``min_count``, most frequent first; ties by
        feature index, then value (deterministic)."""
        features = np.concatenate([np.full(v.size, f, np.int64) for f, v in enumerate(self.values)])
        values = np.concatenate(self.values) if self.values else np.empty(0, np.int64)
        counts = np.concatenate(self.counts) if self.counts else np.empty(0, np.int64)
        keep = counts >= min_count
        features, values, counts = features[keep], values[keep], counts[keep]
        order = np.lexsort((values, features, -counts))
        return features[order], values[order], counts[order]

    # ---- the artifact --------------------------------------------------------------------------------
    def header(self, sha256: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "feature_names": self.feature_names, "capacity": self.capacity,
                "totals": self.totals, "exact": self.exact, "error_bound": self.error_bound,
                "distinct": self.distinct(), "provenance": self.provenance, "sha256": sha256 or {}}

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        offsets = np.cumsum([0] + [v.size for v in self.values]).astype(np.int64)
        values, counts = np.concatenate(self.values), np.concatenate(self.counts)
        sha = checksums({"values": values, "counts": counts, "offsets": offsets})
        with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" suffix
            np.savez(f, header=np.array(json.dumps(self.header(sha), sort_keys=True)), values=values, counts=counts,
                     offsets=offsets)
        os.replace(tmp, path)
        return path


def _open(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"id counts {str(path)!r} do not exist; build them with `{BUILD_COMMAND}`")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not an id-counts (.npz) file: {exc}") from exc


def _read_header(archive: Any, path: str | Path) -> Dict[str, Any]:
    if "header" not in archive.files:
        raise ValueError(f"{path}: not an id-counts file: no header")
    try:
        header = json.loads(str(archive["header"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: id-counts header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format') if isinstance(header, dict) else header!r} "
                         f"is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: id-counts format version {header.get('version')!r}, this code reads {VERSION}; "
                         f"rebuild with `{BUILD_COMMAND}`")
    missing = [k for k in ("feature_names", "capacity", "totals", "exact", "error_bound", "provenance", "sha256")
               if k not in header]
    if missing:
        raise ValueError(f"{path}: id-counts header lacks {missing}")
    return header


def read_header(path: str | Path) -> Dict[str, Any]:
    """The JSON header alone (arrays not read)."""
    with _open(path) as archive:
        return _read_header(archive, path)


def load_counts(path: str | Path) -> IdCounts:
    """Header and arrays, validated (a cut or edited file is an error naming it)."""
    with _open(path) as archive:
        header = _read_header(archive, path)
        missing = [n for n in ("values", "counts", "offsets") if n not in archive.files]
        if missing:
            raise ValueError(f"{path}: id counts lack arrays {missing}")
        values, counts, offsets = (read_verified(archive, name, header["sha256"], path, "id counts", BUILD_COMMAND)
                                   for name in ("values", "counts", "offsets"))
    names = header["feature_names"]
    if (offsets.dtype != np.int64 or offsets.shape != (len(names) + 1,) or int(offsets[0]) != 0
            or int(offsets[-1]) != values.size or values.shape != counts.shape or bool(np.any(np.diff(offsets) < 0))):
        raise ValueError(f"{path}: id-counts arrays are inconsistent with each other or with the header")
    try:
        return IdCounts(list(names), [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                        [counts[a:b] for a, b in zip(offsets[:-1], offsets[1:])], [int(t) for t in header["totals"]],
                        [bool(e) for e in header["exact"]], [int(e) for e in header["error_bound"]],
                        int(header["capacity"]), dict(header["provenance"]))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
