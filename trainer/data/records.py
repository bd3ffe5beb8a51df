"""Value types of the data package: the training ``Batch``, feature names, the dense transform and ``Chunk``.

``Chunk`` is the numpy-side unit every reader produces (rows in file order, sparse ids jagged per feature);
``Chunk.to_batch`` turns it into a TorchRec batch with a feature-major ``KeyedJaggedTensor``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.datasets.utils import Batch as TorchrecBatch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

#: Dense feature names, identical to ``torchrec.datasets.criteo.DEFAULT_INT_NAMES`` (int_0 .. int_12).
DENSE_FEATURES: List[str] = list(DEFAULT_INT_NAMES)
#: Sparse feature names (KJT keys), identical to ``torchrec.datasets.criteo.DEFAULT_CAT_NAMES`` (cat_0 .. cat_25).
SPARSE_FEATURES: List[str] = list(DEFAULT_CAT_NAMES)
NUM_DENSE = len(DENSE_FEATURES)
NUM_SPARSE = len(SPARSE_FEATURES)

#: Smallest raw dense value in Criteo (I2 reaches -3). TorchRec 1.8's ``tsv_to_npys`` computes
#: ``log(x - min + 2)`` with ``min`` taken over the whole file (missing -> 0); on every real Criteo day the
#: minimum is -3, so the transform is ``log(x + 5)``. A per-file minimum cannot be known by a streaming reader
#: and would make days disagree, so the minimum is fixed here.
DENSE_MIN = -3


def dense_transform(raw: np.ndarray) -> np.ndarray:
    """Raw integer dense values (missing already 0) -> float32 ``log(max(x, DENSE_MIN) - DENSE_MIN + 2)``.

    Computed like TorchRec (integer shift, then float32 log of the float32-cast value) so that the TSV
    reader reproduces the preprocessed ``day_*_dense.npy`` bit for bit. Values below ``DENSE_MIN`` (never seen
    in Criteo) are clamped so the result is always finite (>= log 2); so are values within 5 of the int64
    maximum, whose shift would wrap around to a negative number and give NaN (their float32 is unchanged).
    """
    clamped = np.clip(np.asarray(raw, dtype=np.int64), DENSE_MIN, np.iinfo(np.int64).max + (DENSE_MIN - 2))
    shifted = clamped - (DENSE_MIN - 2)
    return np.log(shifted.astype(np.float32))


@dataclass
class Batch(TorchrecBatch):
    """TorchRec ``Batch`` plus the hidden true logit (synthetic data) and a validity mask (eval padding)."""

    oracle_logits: Optional[torch.Tensor] = None  # [B] float32, present when the data set has one
    valid: Optional[torch.Tensor] = None  # [B] bool, False for padding rows of the last eval batch

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, non_blocking=non_blocking)

        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            oracle_logits=move(self.oracle_logits),
            valid=move(self.valid),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for t in (self.oracle_logits, self.valid):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        def pin(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.pin_memory()

        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            oracle_logits=pin(self.oracle_logits),
            valid=pin(self.valid),
        )


@dataclass
class Chunk:
    """Consecutive rows in numpy form. ``ids[f]`` holds feature f's ids of all rows, row after row;
    ``lengths[f, i]`` is how many of them belong to row i (0 = missing)."""

    dense: np.ndarray  # (n, 13) float32, already transformed
    labels: np.ndarray  # (n,) float32
    ids: List[np.ndarray]  # 26 x (sum_i lengths[f, i],) int64
    lengths: np.ndarray  # (26, n) int32
    oracle: Optional[np.ndarray] = None  # (n,) float32

    @property
    def num_rows(self) -> int:
        return int(self.dense.shape[0])

    @staticmethod
    def concat(chunks: Sequence["Chunk"]) -> "Chunk":
        if len(chunks) == 1:
            return chunks[0]
        has_oracle = all(c.oracle is not None for c in chunks)
        return Chunk(
            dense=np.concatenate([c.dense for c in chunks]),
            labels=np.concatenate([c.labels for c in chunks]),
            ids=[np.concatenate([c.ids[f] for c in chunks]) for f in range(NUM_SPARSE)],
            lengths=np.concatenate([c.lengths for c in chunks], axis=1),
            oracle=np.concatenate([c.oracle for c in chunks if c.oracle is not None]) if has_oracle else None,
        )

    def repeat_row(self, row: int, times: int) -> "Chunk":
        """A chunk of ``times`` copies of row ``row`` (used to pad the last eval batch)."""
        offsets = np.zeros((NUM_SPARSE, self.num_rows + 1), dtype=np.int64)
        np.cumsum(self.lengths, axis=1, out=offsets[:, 1:])
        return Chunk(
            dense=np.repeat(self.dense[row : row + 1], times, axis=0),
            labels=np.repeat(self.labels[row : row + 1], times),
            ids=[np.tile(self.ids[f][offsets[f, row] : offsets[f, row + 1]], times) for f in range(NUM_SPARSE)],
            lengths=np.repeat(self.lengths[:, row : row + 1], times, axis=1),
            oracle=None if self.oracle is None else np.repeat(self.oracle[row : row + 1], times),
        )

    def to_batch(self, num_valid: Optional[int] = None) -> Batch:
        """Build a ``Batch``; with ``num_valid`` the rows from ``num_valid`` on are marked as padding."""
        n = self.num_rows
        kjt = KeyedJaggedTensor(
            keys=SPARSE_FEATURES,
            values=torch.from_numpy(np.concatenate(self.ids).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.ascontiguousarray(self.lengths, dtype=np.int32).reshape(-1)),
            stride=n,
        )
        valid = None
        if num_valid is not None:
            valid = torch.zeros(n, dtype=torch.bool)
            valid[:num_valid] = True
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.float32)),
            oracle_logits=None if self.oracle is None else torch.from_numpy(
                np.ascontiguousarray(self.oracle, dtype=np.float32)),
            valid=valid,
        )


class DaySource(abc.ABC):
    """Random access to the rows of one preprocessed day (memory-mapped; nothing is read until ``read``)."""

    num_rows: int

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> Chunk:
        """Rows ``[start, stop)`` of the day, validated."""
