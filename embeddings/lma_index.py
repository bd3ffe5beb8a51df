"""The LMA index artifact: per-value minhash signatures, built by ``compactrec lma-index`` and loaded by ``lma``.

One uncompressed ``.npz`` file (``numpy.load(path, allow_pickle=False)`` reads it) with arrays:

- ``header``: 0-d unicode array, a JSON object (:class:`IndexHeader`): ``format`` = ``compactrec-lma-index``,
  ``version``, the parameters the signatures depend on (``seed``, ``num_chunks`` C, ``num_hashes`` K,
  ``key_seed``, ``feature_names`` in feature-index order, ``min_count``, ``sample_rows``, ``semantic_set``,
  ``context_min_values``), provenance (``source``:
  the fingerprint of the training split, ``trainer.prepare.fingerprint.data_fingerprint``; ``created``) and outcomes
  (rows sampled/available, values seen/covered) and ``sha256``: the sha256 of each array below
  (``embeddings.integrity``), compared when an array is loaded: a damaged file is an error naming it.
- ``keys`` [V] int64, strictly increasing: value keys ``hash64(x, f, key_seed, 0)`` (``embeddings.lma_minhash``).
- ``signatures`` [V, C*K] int32: minhash ``j`` of the value's semantic set (``embeddings.lma_minhash``): with
  ``semantic_set: rows`` the smallest rank of its sampled rows under permutation j; with ``values`` the smallest
  hash of the values of other (context) features it occurs with.
- ``features`` [V] int16: feature index of each value; ``counts`` [V] int32: occurrences in sampled rows.

Training keeps only ``keys`` and per-chunk int32 rows derived from ``signatures`` (see ``embeddings.lma``):
``V * (8 + 4 C)`` bytes, counted in the memory report. Memory size and feature groups are not part of the
artifact (rows are derived at load), so one index serves every memory budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from embeddings.integrity import checksums, read_verified

FORMAT = "compactrec-lma-index"
VERSION = 4  # 2: sample_rows, created, the data fingerprint; rows sampled independent of batching. 3: semantic_set
# 4: sha256 of the arrays
BUILD_COMMAND = "compactrec prepare CONFIG (or compactrec lma-index CONFIG --out PATH)"
REBUILD_COMMAND = "compactrec prepare CONFIG"
ARRAYS = ("keys", "signatures", "features", "counts")


@dataclass
class IndexHeader:
    """The JSON header of an index artifact."""

    seed: int
    num_chunks: int
    num_hashes: int
    key_seed: int
    feature_names: List[str]
    rows_sampled: int
    rows_available: int
    values_seen: int
    values_covered: int
    min_count: int
    sample_rows: int
    semantic_set: str = "rows"
    context_min_values: int = 1000
    values_per_feature: List[int] = field(default_factory=list)
    source: Dict[str, Any] = field(default_factory=dict)
    created: str = ""
    sha256: Dict[str, str] = field(default_factory=dict)  # per array, filled by save_index
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_functions(self) -> int:
        return self.num_chunks * self.num_hashes


@dataclass
class LmaIndex:
    header: IndexHeader
    keys: np.ndarray
    signatures: np.ndarray
    features: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        v = self.keys.shape[0]
        checks = [
            (self.keys.dtype == np.int64 and self.keys.ndim == 1, "keys must be int64 [V]"),
            (self.signatures.dtype == np.int32 and self.signatures.shape == (v, self.header.num_functions),
             f"signatures must be int32 [V, C*K] = [{v}, {self.header.num_functions}]"),
            (self.features.dtype == np.int16 and self.features.shape == (v,), "features must be int16 [V]"),
            (self.counts.dtype == np.int32 and self.counts.shape == (v,), "counts must be int32 [V]"),
            (v == self.header.values_covered, f"header says {self.header.values_covered} values, arrays hold {v}"),
            (v < 2 or bool(np.all(self.keys[1:] > self.keys[:-1])), "keys must be strictly increasing"),
            (v == 0 or 0 <= int(self.features.min()) and int(self.features.max()) < len(self.header.feature_names),
             "feature indices out of range"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid LMA index: {message}")


def save_index(index: LmaIndex, path: str | Path) -> Path:
    """Write ``index`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {name: getattr(index, name) for name in ARRAYS}
    index.header.sha256 = checksums(arrays)
    header = json.dumps(dataclasses.asdict(index.header), sort_keys=True)
    with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" suffix
        np.savez(f, header=np.array(header), **arrays)
    os.replace(tmp, path)
    return path


def _open(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LMA index {str(path)!r} does not exist; build it with `{BUILD_COMMAND}`")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not an LMA index (.npz) file: {exc}") from exc


def _header(archive: Any, path: str | Path) -> IndexHeader:
    if "header" not in archive.files:
        raise ValueError(f"{path}: not an LMA index: no header")
    try:
        data = json.loads(str(archive["header"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: LMA index header is not valid JSON: {exc}") from exc
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: LMA index format version {data.get('version')!r}, this code reads version "
                         f"{VERSION}; rebuild it with `{BUILD_COMMAND}`")
    names = {f.name for f in dataclasses.fields(IndexHeader)}
    unknown, missing = sorted(set(data) - names), sorted(n for n in names if n not in data)
    if unknown or missing:
        raise ValueError(f"{path}: LMA index header has unknown keys {unknown} / lacks keys {missing}")
    return IndexHeader(**data)


def read_header(path: str | Path) -> IndexHeader:
    """The header alone (the arrays are not read)."""
    with _open(path) as archive:
        return _header(archive, path)


def _array(archive: Any, name: str, header: IndexHeader, path: str | Path) -> np.ndarray:
    return read_verified(archive, name, header.sha256, path, "LMA index", REBUILD_COMMAND)


def load_keys_and_counts(path: str | Path) -> Tuple[np.ndarray, np.ndarray]:
    """The sorted value keys and their sample counts alone (for sizing the dictionary without the signatures)."""
    with _open(path) as archive:
        header = _header(archive, path)
        missing = [name for name in ("keys", "counts") if name not in archive.files]
        if missing:
            raise ValueError(f"{path}: LMA index lacks arrays {missing}")
        keys, counts = _array(archive, "keys", header, path), _array(archive, "counts", header, path)
    if keys.dtype != np.int64 or keys.ndim != 1 or counts.shape != keys.shape:
        raise ValueError(f"invalid LMA index {path}: keys must be int64 [V] with one count each")
    return keys, counts


def load_index(path: str | Path) -> LmaIndex:
    """Header and arrays, validated."""
    with _open(path) as archive:
        header = _header(archive, path)
        missing = [name for name in ARRAYS if name not in archive.files]
        if missing:
            raise ValueError(f"{path}: LMA index lacks arrays {missing}")
        return LmaIndex(header, **{name: _array(archive, name, header, path) for name in ARRAYS})


def verify_index(path: str | Path) -> None:
    """Raise a ValueError naming ``path`` unless every array matches the sha256 its header records."""
    with _open(path) as archive:
        header = _header(archive, path)
        for name in ARRAYS:
            if name not in archive.files:
                raise ValueError(f"{path}: LMA index lacks array {name!r}")
            _array(archive, name, header, path)


def check_header(header: IndexHeader, path: str | Path, *, seed: int, num_chunks: int, num_hashes: int,
                 feature_names: Sequence[str], key_seed: int, semantic_set: str = "rows") -> None:
    """Raise if the artifact was built for other settings than the run's (naming each difference)."""
    wanted = {
        "semantic_set": (header.semantic_set, semantic_set, "embeddings.options.semantic_set"),
        "key_seed": (header.key_seed, key_seed, "embeddings.lma_minhash.KEY_SEED of this code"),
        "seed": (header.seed, seed, "embeddings.options.seed"),
        "num_chunks": (header.num_chunks, num_chunks, "model.embedding_dim / embeddings.options.chunk_size"),
        "num_hashes": (header.num_hashes, num_hashes, "embeddings.options.num_hashes"),
        "feature_names": (list(header.feature_names), list(feature_names), "the dataset's sparse features"),
    }
    diffs = [f"{name}: index has {have!r}, the config gives {want!r} ({where})"
             for name, (have, want, where) in wanted.items() if have != want]
    if diffs:
        raise ValueError(f"LMA index {str(path)!r} does not match the config: " + "; ".join(diffs)
                         + f". Rebuild it with `{BUILD_COMMAND}`")
