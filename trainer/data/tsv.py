"""Streamed reader of raw Criteo TSV (Terabyte ``day_N``, Kaggle ``train.txt`` / ``test.txt``).

A line is ``label, I1..I13, C1..C26`` (no label in Kaggle's test.txt), tab separated, empty = missing.
Dense values are integers (may be negative; missing -> 0, then ``dense_transform``); categorical values are
hex hashes kept as raw non-negative int64 ids, a missing one is an empty bag. Files are read line by line.
"""

from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from trainer.data.records import NUM_DENSE, NUM_SPARSE, Chunk, dense_transform

logger = logging.getLogger(__name__)

#: A parsed line: label (-1 without labels), 13 raw dense ints, 26 ids (-1 = missing).
Row = Tuple[int, List[int], List[int]]

_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_INT = re.compile(r"-?[0-9]{1,19}")
_INT64_MAX = 2**63 - 1
_DENSE_COLUMNS = [f"I{i + 1}" for i in range(NUM_DENSE)]
_SPARSE_COLUMNS = [f"C{i + 1}" for i in range(NUM_SPARSE)]
_WARN_FIRST = 5  # bad rows logged at WARNING per parser; the rest at DEBUG


class TsvParser:
    """Parses lines of one file; ``policy`` "error" raises ValueError on a bad row, "skip" counts it in
    ``counts`` (reason -> rows: truncated, column_count, label, dense, categorical) and returns None.
    A last line without a line end counts as truncated: a cut inside its last field would parse."""

    def __init__(self, path: str, has_label: bool = True, policy: str = "error",
                 counts: Optional["collections.Counter[str]"] = None, log: bool = True) -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"bad-row policy {policy!r} is not 'error' or 'skip'")
        self.path = path
        self.has_label = has_label
        self.policy = policy
        self.counts: "collections.Counter[str]" = collections.Counter() if counts is None else counts
        self.num_columns = NUM_DENSE + NUM_SPARSE + (1 if has_label else 0)
        self._logged = 0 if log else -(2**62)  # a counting pass (log=False) logs everything at DEBUG

    def _bad(self, line_no: int, reason: str, message: str) -> None:
        text = f"{self.path}:{line_no}: {message}"
        if self.policy == "error":
            raise ValueError(text)
        self.counts[reason] += 1
        self._logged += 1
        logger.log(logging.WARNING if 0 < self._logged <= _WARN_FIRST else logging.DEBUG, "skipping bad row: %s", text)

    def parse(self, line: str, line_no: int) -> Optional[Row]:
        """Parse one line (``line_no`` is 1-based, for messages); None when skipped."""
        if not line.endswith("\n"):  # only the last line can lack one: cut inside C26, it would still parse
            self._bad(line_no, "truncated", "has no line end (the file is truncated?)")
            return None
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != self.num_columns:
            self._bad(line_no, "column_count", f"has {len(fields)} columns, expected {self.num_columns}")
            return None
        label = -1
        if self.has_label:
            if fields[0] not in ("0", "1"):
                self._bad(line_no, "label", f"column label value {fields[0]!r} is not 0 or 1")
                return None
            label = int(fields[0])
        first = 1 if self.has_label else 0
        dense: List[int] = []
        for col, tok in zip(_DENSE_COLUMNS, fields[first:first + NUM_DENSE]):
            if not tok:
                dense.append(0)
                continue
            if _INT.fullmatch(tok) is None:
                self._bad(line_no, "dense", f"column {col} value {tok!r} is not an integer")
                return None
            value = int(tok)
            if not -_INT64_MAX <= value <= _INT64_MAX:
                self._bad(line_no, "dense", f"column {col} value {tok!r} does not fit int64")
                return None
            dense.append(value)
        ids: List[int] = []
        for col, tok in zip(_SPARSE_COLUMNS, fields[first + NUM_DENSE:]):
            if not tok:
                ids.append(-1)
                continue
            if _HEX.fullmatch(tok) is None:
                self._bad(line_no, "categorical", f"column {col} value {tok!r} is not hex")
                return None
            value = int(tok, 16)
            if value > _INT64_MAX:
                self._bad(line_no, "categorical", f"column {col} value {tok!r} does not fit int64")
                return None
            ids.append(value)
        return label, dense, ids


def count_lines(path: str, block_bytes: int = 1 << 24) -> int:
    """Number of lines of a file (a last line without newline counts), read in binary blocks."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as fin:
        while True:
            block = fin.read(block_bytes)
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (0 if last == b"\n" else 1)


@dataclass
class TsvSegment:
    """Lines ``[line_start, line_stop)`` of a file (one day), of which the valid rows
    ``[row_start, row_stop)`` are used. ``oracle`` (float32, one value per line of the file) is optional."""

    path: str
    line_start: int = 0
    line_stop: Optional[int] = None
    row_start: int = 0
    row_stop: Optional[int] = None
    oracle: Optional[np.ndarray] = None


def iter_rows(seg: TsvSegment, parser: TsvParser,
              wanted: Callable[[int], bool]) -> Iterator[Tuple[int, int, Optional[Row]]]:
    """Yield ``(j, line_index, row)`` for the j-th used valid row of the segment, in file order.

    ``row`` is None when ``wanted(j)`` is false; under the "error" policy such lines are not even parsed
    (rows are then numbered by line), under "skip" every line is parsed so all ranks number rows alike.
    """
    fast = parser.policy == "error"
    valid = -1
    with open(seg.path, "r", encoding="ascii", errors="replace", newline="\n") as fin:
        for index, line in enumerate(fin):
            if index < seg.line_start:
                continue
            if seg.line_stop is not None and index >= seg.line_stop:
                return
            row: Optional[Row] = None
            if not fast:
                row = parser.parse(line, index + 1)
                if row is None:
                    continue
            valid += 1
            if valid < seg.row_start:
                continue
            if seg.row_stop is not None and valid >= seg.row_stop:
                return
            j = valid - seg.row_start
            if not wanted(j):
                yield j, index, None
            elif fast:
                yield j, index, parser.parse(line, index + 1)
            else:
                yield j, index, row


def count_rows(seg: TsvSegment, has_label: bool, policy: str) -> int:
    """Used rows of a segment: lines under "error", parsed valid rows under "skip" (a quiet
    counting pass)."""
    if policy == "error":
        total = count_lines(seg.path)
        lines = min(total, seg.line_stop if seg.line_stop is not None else total) - seg.line_start
        stop = lines if seg.row_stop is None else min(lines, seg.row_stop)
        return max(0, stop - seg.row_start)
    quiet = TsvParser(seg.path, has_label, policy, log=False)
    return sum(1 for _ in iter_rows(seg, quiet, lambda j: False))


def rows_to_chunk(rows: Sequence[Row], oracle: Optional[Sequence[float]] = None) -> Chunk:
    """Vectorise parsed rows into a ``Chunk`` (missing ids become zero-length bags)."""
    labels = np.array([r[0] for r in rows], dtype=np.float32)
    dense = dense_transform(np.array([r[1] for r in rows], dtype=np.int64).reshape(len(rows), NUM_DENSE))
    cats = np.array([r[2] for r in rows], dtype=np.int64).reshape(len(rows), NUM_SPARSE)
    present = cats >= 0
    return Chunk(
        dense=dense,
        labels=labels,
        ids=[cats[present[:, f], f] for f in range(NUM_SPARSE)],
        lengths=np.ascontiguousarray(present.T, dtype=np.int32),
        oracle=None if oracle is None else np.asarray(oracle, dtype=np.float32),
    )
