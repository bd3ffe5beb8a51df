"""Writers for one day: Terabyte-style TSV and TorchRec npy files, streamed chunk by chunk.

Files are written under ``*.partial`` names and renamed when the day is complete; the manifest is written
last, so an interrupted run leaves no manifest (and possibly ``*.partial`` files) behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from trainer.data.records import dense_transform

from .keyed_random import token_of

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_TAB, _NL, _MINUS, _ZERO = 9, 10, 45, 48
_DIGITS = 7  # dense values are clipped to 7 decimal digits (layout.DENSE_MAX)
_DENSE_W, _CAT_W = _DIGITS + 2, 9  # sign + digits + tab; 8 hex digits + tab


def format_tsv(labels: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray, sparse: np.ndarray) -> bytes:
    """TSV lines ``label, I1..I13, C1..C26`` (missing = empty field) for a block of rows.

    Built as a fixed-width byte matrix in which unused positions hold NUL, which are dropped at the end;
    no per-row Python code runs.
    """
    n, nd = dense.shape
    nc = sparse.shape[1]
    width = 2 + nd * _DENSE_W + nc * _CAT_W
    m = np.zeros((n, width), dtype=np.uint8)
    m[:, 0] = _ZERO + labels.reshape(-1).astype(np.uint8)
    m[:, 1] = _TAB
    base = 2 + _DENSE_W * np.arange(nd)
    mag = np.abs(dense)
    present = ~dense_missing
    m[:, base] = np.where(present & (dense < 0), _MINUS, 0).astype(np.uint8)
    for p in range(_DIGITS):
        scale = 10**p
        digit = (mag // scale) % 10
        keep = present & ((p == 0) | (mag >= scale))
        m[:, base + _DIGITS - p] = np.where(keep, _ZERO + digit, 0).astype(np.uint8)
    m[:, base + _DIGITS + 1] = _TAB
    cbase = 2 + nd * _DENSE_W + _CAT_W * np.arange(nc)
    tokens = np.stack([token_of(f, sparse[:, f]) for f in range(nc)], axis=1)
    cpresent = sparse != 0
    for q in range(8):
        nib = (tokens >> np.uint32(28 - 4 * q)) & np.uint32(15)
        m[:, cbase + q] = np.where(cpresent, _HEX[nib], 0)
    m[:, cbase + 8] = _TAB
    m[:, -1] = _NL
    flat = m.reshape(-1)
    return flat[flat != 0].tobytes()


class DayWriter:
    """Streams one day's rows into ``day_{i}`` TSV and the npy files (temporary names until ``close``)."""

    def __init__(self, out_dir: Path, day: int, rows: int, write_tsv: bool, write_npy: bool) -> None:
        self.out, self.day, self.rows, self.pos = out_dir, day, rows, 0
        self.dense_min: int | None = None
        self.targets: dict[str, Path] = {}
        self.tsv: BinaryIO | None = None
        if write_tsv:
            self.tsv = open(self._tmp(f"day_{day}"), "wb")  # noqa: SIM115 - closed in close()
        self.arrays: dict[str, np.memmap] = {}
        specs: dict[str, tuple[type, tuple[int, ...]]] = {"oracle_logits": (np.float32, (rows,))}
        if write_npy:
            specs["dense"] = (np.float32, (rows, 13))
            specs["sparse"] = (np.int32, (rows, 26))
            specs["labels"] = (np.int32, (rows, 1))
        for kind, (dtype, shape) in specs.items():
            path = self._tmp(f"day_{day}_{kind}.npy")
            self.arrays[kind] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _tmp(self, name: str) -> Path:
        final = self.out / name
        self.targets[name] = final
        return final.with_name(name + ".partial")

    def write(
        self, labels: np.ndarray, dense: np.ndarray, dmiss: np.ndarray, sparse: np.ndarray, logits: np.ndarray
    ) -> None:
        """Append a chunk of rows."""
        a, b = self.pos, self.pos + labels.shape[0]
        if b > self.rows:
            raise ValueError(f"day {self.day}: writing rows {a}..{b} past the day's {self.rows} rows")
        if self.tsv is not None:
            self.tsv.write(format_tsv(labels, dense, dmiss, sparse))
        self.arrays["oracle_logits"][a:b] = logits
        if "dense" in self.arrays:
            self.arrays["dense"][a:b] = dense  # raw integers for now (exact in float32); transformed in close()
            self.arrays["sparse"][a:b] = sparse
            self.arrays["labels"][a:b, 0] = labels
        lo = int(dense.min())
        self.dense_min = lo if self.dense_min is None else min(self.dense_min, lo)
        self.pos = b

    def close(self, chunk_rows: int) -> list[str]:
        """Apply the dense transform in place, flush, and rename every file to its final name."""
        if self.pos != self.rows:
            raise RuntimeError(f"day {self.day}: {self.pos} rows written, {self.rows} expected")
        if self.tsv is not None:
            self.tsv.close()
        if "dense" in self.arrays:
            d = self.arrays["dense"]
            for a in range(0, self.rows, chunk_rows):
                # the readers' fixed-minimum transform (min -3, Criteo's I2 floor): TSV and npy then agree on
                # every day, and equal TorchRec's per-file transform whenever the day reaches -3 (all of ours)
                d[a : a + chunk_rows] = dense_transform(d[a : a + chunk_rows])
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        for name, final in self.targets.items():
            os.replace(final.with_name(name + ".partial"), final)
        return sorted(self.targets)
