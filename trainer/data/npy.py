"""Memory-mapped reader of TorchRec / MLPerf one-hot preprocessed days.

``day_{i}_dense.npy`` float32 (N, 13), ``day_{i}_sparse.npy`` int32/int64 (N, 26),
``day_{i}_labels.npy`` integer (N, 1) or (N,), optional ``day_{i}_oracle_logits.npy`` float32 (N,).
TorchRec's ``npy_preproc_criteo --dataset_name criteo_kaggle`` writes the same arrays under the stem ``train``
(``train_{dense,sparse,labels}.npy``: float32, int64 raw ids, int32): a ``day`` given as a string is such a
stem. Arrays are opened with ``mmap_mode="r"``; only the rows asked for are read, and validated as they are read.
"""

from __future__ import annotations

import logging
import os
import tokenize
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np

from trainer.data.records import NUM_DENSE, NUM_SPARSE, SPARSE_FEATURES, Chunk, DaySource

logger = logging.getLogger(__name__)


#: A day index (files ``day_{i}_*``) or a file stem such as TorchRec's Kaggle ``train`` (files ``train_*``).
DayName = Union[int, str]


def day_path(directory: str, day: DayName, suffix: str) -> str:
    """``DIR/day_{day}_{suffix}`` (suffix e.g. "dense.npy"), or ``DIR/{day}_{suffix}`` for a stem."""
    stem = day if isinstance(day, str) else f"day_{day}"
    return os.path.join(directory, f"{stem}_{suffix}")


def read_npy_header(fin: BinaryIO, where: str) -> Tuple[Tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the .npy starting at ``fin``'s position; a missing or
    cut magic/header raises a ValueError naming ``where`` (numpy's own errors name no file)."""
    try:
        version = np.lib.format.read_magic(fin)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fin)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fin)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, SyntaxError, tokenize.TokenError) as exc:  # numpy parses the dict with ast
        raise ValueError(f"{where}: not a readable .npy header (truncated or not a .npy file?): {exc}") from exc
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects ({dtype}), expected numbers")
    return tuple(int(n) for n in shape), bool(fortran), dtype, fin.tell()


def open_array(path: str) -> np.ndarray:
    """Memory-map a .npy file (no pickles). A cut or corrupt header, and a file whose size is not what its
    header says (truncated, or bytes appended), raise a ValueError naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fin:
        shape, _, dtype, offset = read_npy_header(fin, path)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if offset + nbytes != size:
        raise ValueError(f"{path}: header says shape {shape} {dtype} ({nbytes} bytes of data) but the file holds "
                         f"{size - offset} bytes after the header (truncated or appended to?)")
    array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    return array


def expect(path: str, array: np.ndarray, ok: bool, expected: str) -> None:
    """Raise a ValueError naming the file, what was expected and what was found, unless ``ok``."""
    if not ok:
        raise ValueError(f"{path}: expected {expected}, found {array.dtype} array of shape {array.shape}")


def check_ids(path: str, ids: np.ndarray, first_row: int, feature: Optional[int] = None) -> None:
    """Raise naming file, row and column/feature if an id of the 2-D block ``ids`` is negative. With
    ``feature`` None the block is (rows, 26) and column c is feature c; else it is feature's (rows, k) ids."""
    if ids.size and ids.min() < 0:
        row, col = (int(x) for x in np.argwhere(ids < 0)[0])
        f = col if feature is None else feature
        raise ValueError(f"{path}: row {first_row + row} column {col} ({SPARSE_FEATURES[f]}): "
                         f"id {int(ids[row, col])} is negative")


class DenseLabels:
    """The dense, labels and optional oracle arrays of one day, shared by the npy and npz readers."""

    def __init__(self, directory: str, day: DayName) -> None:
        self.dense_path = day_path(directory, day, "dense.npy")
        self.labels_path = day_path(directory, day, "labels.npy")
        self.oracle_path = day_path(directory, day, "oracle_logits.npy")
        self.dense = open_array(self.dense_path)
        expect(self.dense_path, self.dense,
               self.dense.dtype == np.float32 and self.dense.ndim == 2 and self.dense.shape[1] == NUM_DENSE,
               f"float32 array of shape (N, {NUM_DENSE})")
        self.labels = open_array(self.labels_path)
        expect(self.labels_path, self.labels, np.issubdtype(self.labels.dtype, np.integer) and (
            self.labels.ndim == 1 or (self.labels.ndim == 2 and self.labels.shape[1] == 1)),
            "integer array of shape (N, 1) or (N,)")
        self.oracle: Optional[np.ndarray] = None
        if os.path.exists(self.oracle_path):
            self.oracle = open_array(self.oracle_path)
            expect(self.oracle_path, self.oracle, self.oracle.dtype == np.float32 and self.oracle.ndim == 1,
                   "float32 array of shape (N,)")
        self.num_rows = int(self.dense.shape[0])
        if self.num_rows == 0:  # a day never is empty: an empty array is a writer that failed
            raise ValueError(f"{self.dense_path}: holds no rows")

    def check_rows(self, named: Tuple[Tuple[str, int], ...]) -> None:
        """All arrays of the day must have the same number of rows."""
        counts = ((self.dense_path, self.num_rows), (self.labels_path, int(self.labels.shape[0])), *named)
        if self.oracle is not None:
            counts += ((self.oracle_path, int(self.oracle.shape[0])),)
        if len({n for _, n in counts}) > 1:
            found = ", ".join(f"{p}: {n}" for p, n in counts)
            raise ValueError(f"row counts differ between the files of one day ({found})")

    def read(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Copies of rows [start, stop): dense (n, 13) float32, labels (n,) float32, oracle or None."""
        dense = np.array(self.dense[start:stop], dtype=np.float32)
        finite = np.isfinite(dense)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise ValueError(f"{self.dense_path}: row {start + int(row)} column {int(col)}: "
                             f"value {dense[row, col]} is not finite")
        raw_labels = np.asarray(self.labels[start:stop]).reshape(-1)
        bad = (raw_labels != 0) & (raw_labels != 1)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{self.labels_path}: row {start + row}: label {int(raw_labels[row])} is not 0 or 1")
        oracle = None
        if self.oracle is not None:
            oracle = np.array(self.oracle[start:stop], dtype=np.float32)
            if not np.isfinite(oracle).all():
                row = int(np.argmax(~np.isfinite(oracle)))
                raise ValueError(f"{self.oracle_path}: row {start + row}: value {oracle[row]} is not finite")
        return dense, raw_labels.astype(np.float32), oracle


class NpyDay(DaySource):
    """One one-hot day: one id per sample per feature."""

    def __init__(self, directory: str, day: DayName) -> None:
        self.base = DenseLabels(directory, day)
        self.sparse_path = day_path(directory, day, "sparse.npy")
        self.sparse = open_array(self.sparse_path)
        expect(self.sparse_path, self.sparse, self.sparse.dtype in (np.int32, np.int64)
               and self.sparse.ndim == 2 and self.sparse.shape[1] == NUM_SPARSE,
               f"int32 or int64 array of shape (N, {NUM_SPARSE})")
        self.base.check_rows(((self.sparse_path, int(self.sparse.shape[0])),))
        self.num_rows = self.base.num_rows
        self.has_oracle = self.base.oracle is not None

    def read(self, start: int, stop: int) -> Chunk:
        dense, labels, oracle = self.base.read(start, stop)
        sparse = np.array(self.sparse[start:stop], dtype=np.int64)
        check_ids(self.sparse_path, sparse, start)
        by_feature = np.ascontiguousarray(sparse.T)  # (26, n): row f = feature f's ids, one per sample
        return Chunk(dense=dense, labels=labels, ids=list(by_feature),
                     lengths=np.ones((NUM_SPARSE, stop - start), dtype=np.int32), oracle=oracle)
