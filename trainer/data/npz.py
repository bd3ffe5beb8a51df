"""Reader of MLPerf DLRMv2 multi-hot days: npy dense/labels + ``day_{i}_sparse_multi_hot.npz``.

The npz (written by ``np.savez``, uncompressed) holds arrays "0".."25", each integer (N, size_f): size_f ids
per sample for feature f. ``np.load`` of an npz reads a member whole, so members are memory-mapped here: the
member's data starts after its zip local header, and there it is an ordinary .npy (magic, header, data).
"""

from __future__ import annotations

import logging
import struct
import zipfile
from typing import Dict, List

import numpy as np

from trainer.data.npy import DayName, DenseLabels, check_ids, day_path, expect, read_npy_header
from trainer.data.records import NUM_SPARSE, Chunk, DaySource

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset in the file where the (stored) member's bytes begin."""
    with open(path, "rb") as fin:
        fin.seek(info.header_offset)
        raw = fin.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != _LOCAL_MAGIC:
        raise ValueError(f"{path}: member {info.filename!r}: no zip local header at offset {info.header_offset}")
    name_len, extra_len = fields[-2], fields[-1]
    return int(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)


def open_npz_lazily(path: str) -> Dict[str, np.ndarray]:
    """Memory-map every ``.npy`` member of an uncompressed npz; returns {name without .npy: read-only array}."""
    arrays: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable zip/npz file (truncated?): {exc}") from exc
    for info in infos:
        if not info.filename.endswith(".npy"):
            continue
        name = info.filename[: -len(".npy")]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ValueError(f"{path}: member {info.filename!r} is compressed or encrypted; memory-mapping needs "
                             "an uncompressed npz (np.savez, not np.savez_compressed)")
        start = _member_data_offset(path, info)
        with open(path, "rb") as fin:
            fin.seek(start)
            shape, fortran, dtype, data_offset = read_npy_header(fin, f"{path}: member {info.filename!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if data_offset - start + nbytes != info.file_size:
            raise ValueError(f"{path}: member {info.filename!r}: header says {shape} {dtype} "
                             f"but the member holds {info.file_size} bytes")
        if nbytes == 0:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=tuple(shape),
                                     order="F" if fortran else "C")
    return arrays


class NpzDay(DaySource):
    """One multi-hot day: ``size_f`` ids per sample for feature f (every bag has length size_f)."""

    def __init__(self, directory: str, day: DayName) -> None:
        self.base = DenseLabels(directory, day)
        self.sparse_path = day_path(directory, day, "sparse_multi_hot.npz")
        members = open_npz_lazily(self.sparse_path)
        expected = [str(f) for f in range(NUM_SPARSE)]
        missing = [name for name in expected if name not in members]
        unknown = sorted(set(members) - set(expected))  # e.g. another feature set's file: never ignored
        if missing or unknown:
            raise ValueError(f"{self.sparse_path}: expected arrays '0'..'{NUM_SPARSE - 1}', "
                             f"missing {missing}, unexpected {unknown} (found {sorted(members)})")
        self.features: List[np.ndarray] = []
        for f in range(NUM_SPARSE):
            array = members[str(f)]
            expect(f"{self.sparse_path}[{str(f)!r}]", array, array.dtype in (np.int32, np.int64) and array.ndim == 2
                   and array.shape[1] >= 1, "int32 or int64 array of shape (N, size_f) with size_f >= 1")
            self.features.append(array)
        self.base.check_rows(tuple((f"{self.sparse_path}[{str(f)!r}]", int(a.shape[0])) for f, a in
                                   enumerate(self.features)))
        self.num_rows = self.base.num_rows
        self.has_oracle = self.base.oracle is not None
        self.sizes = [int(a.shape[1]) for a in self.features]

    def read(self, start: int, stop: int) -> Chunk:
        dense, labels, oracle = self.base.read(start, stop)
        ids = []
        for f, array in enumerate(self.features):
            block = np.array(array[start:stop], dtype=np.int64)
            check_ids(f"{self.sparse_path}[{str(f)!r}]", block, start, f)
            ids.append(block.reshape(-1))
        lengths = np.repeat(np.asarray(self.sizes, dtype=np.int32)[:, None], stop - start, axis=1)
        return Chunk(dense=dense, labels=labels, ids=ids, lengths=lengths, oracle=oracle)
