"""Per-rank batches of a split, identical in number and size on every rank.

Dataset directory (``DataConfig.path``): ``day_{i}`` raw TSV; ``day_{i}_{dense,sparse,labels}.npy``;
optional ``day_{i}_sparse_multi_hot.npz`` and ``day_{i}_oracle_logits.npy``; ``manifest.json`` (read only for
the table sizes of an on-the-fly multi-hot expansion, see ``trainer/data/multihot.py``).

Criteo Kaggle as one file (``data.kaggle_file``): raw ``train.txt`` (tsv) or TorchRec's ``train_{dense,sparse,
labels}.npy`` (npy, stem ``train``), cut by row count into ``num_days`` consecutive "days" the same way, so
both inputs give the same splits.

Which reader a day gets: "npy" -> ``NpyDay`` (one-hot), or ``MultiHotDay`` when ``multi_hot_sizes`` is set;
"npz" -> ``NpzDay`` when the day's npz exists, else ``MultiHotDay`` over the one-hot npy day if
``multi_hot_sizes`` is set (logged), else an error.

Sharing rule: the split's rows (days concatenated in order) form global batches of ``B * W`` rows and rank r
takes rows ``[g*B*W + r*B, g*B*W + (r+1)*B)`` of global batch g. Train drops the last partial global batch.
Eval (val/test) keeps it: its rows are split as evenly as possible into contiguous pieces, and every rank
pads its piece to the common size by repeating a real row, marked ``valid=False``. A single process with
batch ``B*W`` therefore sees exactly the concatenation of the W ranks' batches.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from trainer.data import tsv
from trainer.data.data_config import SPLITS, DataConfig
from trainer.data.multihot import NPZ_SUFFIX, MultiHotDay, MultiHotSpec, multi_hot_spec, tables_for
from trainer.data.npy import DayName, NpyDay, day_path, expect, open_array
from trainer.data.npz import NpzDay
from trainer.data.records import DENSE_FEATURES, SPARSE_FEATURES, Batch, Chunk, DaySource

logger = logging.getLogger(__name__)

# The file stem TorchRec's `npy_preproc_criteo --dataset_name criteo_kaggle` gives Kaggle's train.txt.
KAGGLE_NPY_STEM = "train"

def feature_names() -> Tuple[List[str], List[str]]:
    """(dense feature names, sparse feature names = KJT keys)."""
    return list(DENSE_FEATURES), list(SPARSE_FEATURES)


@dataclass(frozen=True)
class Span:
    """One rank's batch: split rows ``[start, stop)`` of which the first ``num_valid`` are real (0 when the
    rank's piece of the last eval batch is empty and a row is borrowed for padding); padded to ``size``.
    ``release`` is the end of the global batch: streamed readers emit the batch once it is complete."""

    start: int
    stop: int
    num_valid: int
    size: int
    release: int


def plan_spans(num_rows: Optional[int], per_rank: int, rank: int, world_size: int,
               keep_partial: bool) -> Iterator[Span]:
    """The rank's batches in order; ``num_rows`` None = unknown length (streamed training, endless plan)."""
    step = per_rank * world_size
    g = 0
    while num_rows is None or (g + 1) * step <= num_rows:
        start = g * step + rank * per_rank
        yield Span(start, start + per_rank, per_rank, per_rank, (g + 1) * step)
        g += 1
    assert num_rows is not None  # an unknown length never leaves the loop
    remainder = num_rows - g * step
    if keep_partial and remainder > 0:
        share, extra = divmod(remainder, world_size)
        size = share + (1 if extra else 0)
        mine = share + (1 if rank < extra else 0)
        start = g * step + rank * share + min(rank, extra)
        if mine:
            yield Span(start, start + mine, mine, size, num_rows)
        else:
            yield Span(num_rows - 1, num_rows, 0, size, num_rows)


def _to_batch(chunk: Chunk, span: Span, is_eval: bool) -> Batch:
    if chunk.num_rows != span.stop - span.start:
        raise ValueError(f"data ended early: got {chunk.num_rows} rows for split rows [{span.start}, {span.stop}) "
                         "(did a file change while it was read?)")
    if span.size > chunk.num_rows:
        chunk = Chunk.concat([chunk, chunk.repeat_row(chunk.num_rows - 1, span.size - chunk.num_rows)])
    return chunk.to_batch(num_valid=span.num_valid if is_eval else None)


class _ArraySplit:
    """Pieces ``(day, first row, end row)`` of preprocessed days read as one sequence of rows."""

    def __init__(self, pieces: Sequence[Tuple[DaySource, int, int]]) -> None:
        self.pieces = list(pieces)
        self.num_rows = sum(stop - start for _, start, stop in self.pieces)
        with_oracle = [bool(getattr(day, "has_oracle", False)) for day, _, _ in self.pieces]
        self.use_oracle = all(with_oracle)
        if any(with_oracle) and not self.use_oracle:
            logger.warning("oracle logits exist for only some days of the split; batches will carry none")

    def read(self, start: int, stop: int) -> Chunk:
        parts: List[Chunk] = []
        offset = 0
        for day, first, end in self.pieces:
            lo, hi = max(start, offset), min(stop, offset + end - first)
            if lo < hi:
                parts.append(day.read(first + lo - offset, first + hi - offset))
            offset += end - first
        chunk = Chunk.concat(parts)
        if not self.use_oracle:
            chunk.oracle = None
        return chunk


def kaggle_day_starts(path: str, rows: int, num_days: int, unit: str = "rows") -> List[int]:
    """First row of each of the ``num_days`` consecutive "days" a Kaggle file of ``rows`` rows (or lines) is
    cut into (the first ``rows % num_days`` days get one extra row), plus ``rows``."""
    if rows < num_days:  # some "days" would be empty
        raise ValueError(f"{path}: {rows} {unit} cannot be cut into data.num_days={num_days} days")
    per_day, extra = divmod(rows, num_days)
    return [d * per_day + min(d, extra) for d in range(num_days + 1)]


def _tsv_segments(cfg: DataConfig, days: Sequence[int]) -> List[tsv.TsvSegment]:
    if cfg.kaggle_file is not None:
        path = os.path.join(cfg.path, cfg.kaggle_file)
        starts = kaggle_day_starts(path, tsv.count_lines(path), cfg.num_days, unit="lines")
        return [tsv.TsvSegment(path, line_start=starts[d], line_stop=starts[d + 1]) for d in days]
    segments = []
    for d in days:
        path = os.path.join(cfg.path, f"day_{d}")
        if os.path.getsize(path) == 0:  # a day never is empty: a file cut at byte 0 (names a missing file too)
            raise ValueError(f"{path}: empty file")
        oracle: Optional[np.ndarray] = None
        oracle_path = day_path(cfg.path, d, "oracle_logits.npy")
        if os.path.exists(oracle_path):  # one value per line of day_{d}; a short one is found as lines are read
            oracle = open_array(oracle_path)
            expect(oracle_path, oracle, oracle.dtype == np.float32 and oracle.ndim == 1, "float32 array of shape (N,)")
            lines = tsv.count_lines(path)
            if oracle.shape[0] > lines:  # whole lines lost at the end of day_{d}: the oracle still knows them
                raise ValueError(f"{path}: has {lines} lines but {oracle_path} holds {oracle.shape[0]} values "
                                 "(the day file is truncated?)")
        segments.append(tsv.TsvSegment(path, oracle=oracle))
    return segments


def open_day(cfg: DataConfig, day: DayName, spec: Optional[MultiHotSpec]) -> DaySource:
    """The reader of one preprocessed day, or of the Kaggle file named by its stem (see the module doc)."""
    npz_path = day_path(cfg.path, day, NPZ_SUFFIX)
    if cfg.format == "npz" and os.path.exists(npz_path):
        npz_day = NpzDay(cfg.path, day)
        if spec is not None and npz_day.sizes != spec.effective_sizes:
            raise ValueError(f"{npz_path}: holds {npz_day.sizes} ids per sample, data.multi_hot_sizes gives "
                             f"{spec.effective_sizes}")
        return npz_day
    if cfg.format == "npz" and spec is None:
        raise FileNotFoundError(f"{npz_path}: no such file; set data.multi_hot_sizes to expand "
                                f"{day_path(cfg.path, day, 'sparse.npy')} on the fly instead")
    dense = day_path(cfg.path, day, "dense.npy")
    kaggle = day_path(cfg.path, KAGGLE_NPY_STEM, "dense.npy")
    if cfg.kaggle_file is None and not os.path.exists(dense) and os.path.exists(kaggle):
        raise FileNotFoundError(
            f"{dense}: no such file; {cfg.path} holds TorchRec's Criteo Kaggle arrays "
            f"{KAGGLE_NPY_STEM}_{{dense,sparse,labels}}.npy (npy_preproc_criteo --dataset_name criteo_kaggle): read "
            f"them with data.kaggle_file={KAGGLE_NPY_STEM}, cut into data.num_days={cfg.num_days} days (preset "
            "configs/criteo_kaggle_npy.yaml, see docs/DATA.md)")
    if spec is None:
        return NpyDay(cfg.path, day)
    if cfg.format == "npz":
        logger.info("%s is absent: expanding the one-hot day %s to multi-hot on the fly", npz_path, day)
    return MultiHotDay(NpyDay(cfg.path, day), tables_for(spec))


_Source = Union[List[tsv.TsvSegment], _ArraySplit]


def _split_source(cfg: DataConfig, split: str) -> Tuple[_Source, int]:
    """(segments or _ArraySplit, row count or -1 when unknown without a pass over the data)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    days = cfg.train_days if split == "train" else [cfg.eval_day]
    if cfg.format == "tsv":
        segments = _tsv_segments(cfg, days)
        if split == "train":
            return segments, -1
        (seg,) = segments
        total = tsv.count_rows(seg, cfg.tsv_has_label, cfg.bad_rows)
        half = math.ceil(total / 2)
        seg.row_start, seg.row_stop = (0, half) if split == "val" else (half, None)
        return segments, (half if split == "val" else total - half)
    spec = multi_hot_spec(cfg)
    if cfg.kaggle_file is not None:  # one file, its consecutive "days" are row ranges of it
        whole = open_day(cfg, cfg.kaggle_file, spec)
        starts = kaggle_day_starts(day_path(cfg.path, cfg.kaggle_file, "dense.npy"), whole.num_rows, cfg.num_days)
        pieces = [(whole, starts[d], starts[d + 1]) for d in days]
    else:
        pieces = [(day, 0, day.num_rows) for day in (open_day(cfg, d, spec) for d in days)]
    if split == "train":
        source = _ArraySplit(pieces)
    else:
        day, first, end = pieces[0]
        half = first + math.ceil((end - first) / 2)
        source = _ArraySplit([(day, first, half) if split == "val" else (day, half, end)])
    return source, source.num_rows


def count_rows(cfg: DataConfig, split: str) -> int:
    """Rows of a split over all ranks (TSV: valid rows under the "skip" policy, which needs a parse)."""
    source, rows = _split_source(cfg, split)
    if rows >= 0 or isinstance(source, _ArraySplit):
        return rows
    return sum(tsv.count_rows(seg, cfg.tsv_has_label, cfg.bad_rows) for seg in source)


class BatchStream(Iterator[Batch]):
    """The rank's batches. ``num_batches`` is known up front except for streamed TSV training;
    ``bad_row_counts`` (reason -> rows, TSV "skip" policy) is complete once the stream is exhausted; whoever
    made the stream asks it (every rank parses every line, so rank 0's counts cover the whole split)."""

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split = split
        self.bad_row_counts: "collections.Counter[str]" = collections.Counter()
        source, rows = _split_source(cfg, split)
        is_eval = split != "train"
        per_rank = cfg.eval_batch_size if is_eval else cfg.batch_size
        limit = cfg.limit_eval_batches if is_eval else cfg.limit_train_batches
        spans = itertools.islice(plan_spans(rows if rows >= 0 else None, per_rank, rank, world_size, is_eval),
                                 limit)
        self.num_batches: Optional[int] = None
        if rows >= 0:
            full = math.ceil(rows / (per_rank * world_size)) if is_eval else rows // (per_rank * world_size)
            self.num_batches = full if limit is None else min(full, limit)
            if rank == 0:
                logger.debug("%s: %d rows, %d batches of %d per rank", split, rows, self.num_batches, per_rank)
        self._batches: Iterator[Batch]
        if isinstance(source, _ArraySplit):
            self._batches = (_to_batch(source.read(s.start, s.stop), s, is_eval) for s in spans)
        else:
            self._batches = self._stream_tsv(source, cfg, spans, is_eval, report=rank == 0)

    def __next__(self) -> Batch:
        return next(self._batches)

    def _stream_tsv(self, segments: List[tsv.TsvSegment], cfg: DataConfig, spans: Iterator[Span],
                    is_eval: bool, report: bool) -> Iterator[Batch]:
        span = next(spans, None)
        rows: List[tsv.Row] = []
        oracle: List[float] = []
        use_oracle = all(seg.oracle is not None for seg in segments)
        if not use_oracle and any(seg.oracle is not None for seg in segments):
            logger.warning("oracle logits exist for only some days of the split; batches will carry none")
        base = 0

        def wanted(j: int) -> bool:
            return span is not None and span.start <= base + j < span.stop

        for seg in segments:
            if span is None:
                break
            parser = tsv.TsvParser(seg.path, cfg.tsv_has_label, cfg.bad_rows, self.bad_row_counts)
            seen = base
            for j, index, row in tsv.iter_rows(seg, parser, wanted):
                seen = base + j + 1
                if row is not None:
                    rows.append(row)
                    if use_oracle:
                        assert seg.oracle is not None
                        if index >= seg.oracle.shape[0]:
                            raise ValueError(f"{seg.path}: line {index + 1} has no oracle logit: the oracle file "
                                             f"holds {seg.oracle.shape[0]} values")
                        oracle.append(float(seg.oracle[index]))
                while span is not None and seen >= span.release:
                    yield _to_batch(tsv.rows_to_chunk(rows, oracle if use_oracle else None), span, is_eval)
                    rows, oracle = [], []
                    span = next(spans, None)
                if span is None:
                    break
            base = seen
        if is_eval and span is not None:
            raise ValueError(f"{self.split}: data ended after {base} rows, before the counted end "
                             "(did a file change while it was read?)")
        if report and self.bad_row_counts:
            logger.warning("%s: skipped %d bad rows: %s", self.split, sum(self.bad_row_counts.values()),
                           dict(self.bad_row_counts))


def pooling_factors(cfg: DataConfig, sample_rows: int = 10_000) -> List[float]:
    """Mean ids per sample for each sparse feature, from the first training day: 1.0 for npy (one-hot),
    ``size_f`` for npz or an on-the-fly multi-hot expansion, and for TSV the share of non-missing values in
    its first rows."""
    day: DayName = cfg.train_days[0] if cfg.kaggle_file is None or cfg.format == "tsv" else cfg.kaggle_file
    spec = multi_hot_spec(cfg)
    if cfg.format == "npz" and os.path.exists(day_path(cfg.path, day, NPZ_SUFFIX)):
        return [float(size) for size in NpzDay(cfg.path, day).sizes]
    if spec is not None:
        return [float(size) for size in spec.effective_sizes]
    if cfg.format == "npy":
        return [1.0] * len(SPARSE_FEATURES)
    if cfg.format == "npz":
        return [float(size) for size in NpzDay(cfg.path, day).sizes]
    seg = _tsv_segments(cfg, [cfg.train_days[0]])[0]
    parser = tsv.TsvParser(seg.path, cfg.tsv_has_label, cfg.bad_rows, log=False)
    rows = [row for _, _, row in itertools.islice(tsv.iter_rows(seg, parser, lambda j: True), sample_rows)
            if row is not None]
    if not rows:
        raise ValueError(f"{seg.path}: no valid rows to measure pooling factors from")
    return tsv.rows_to_chunk(rows).lengths.mean(axis=1).astype(float).tolist()


def make_batches(cfg: DataConfig, split: str, rank: int, world_size: int) -> BatchStream:
    """Batches of ``split`` ("train", "val", "test") for ``rank`` of ``world_size``; see the module doc."""
    return BatchStream(cfg, split, rank, world_size)


def iter_split_chunks(cfg: DataConfig, split: str, rows_per_chunk: int = 1 << 16) -> Iterator[Chunk]:
    """Every row of ``split`` once, in data order, as chunks of at most ``rows_per_chunk`` rows (no batching,
    no rank share, no partial batch dropped): for passes over the data such as id counting."""
    source, _ = _split_source(cfg, split)
    if isinstance(source, _ArraySplit):
        for start in range(0, source.num_rows, rows_per_chunk):
            yield source.read(start, min(start + rows_per_chunk, source.num_rows))
        return
    skips: "collections.Counter[str]" = collections.Counter()
    for seg in source:
        parser = tsv.TsvParser(seg.path, cfg.tsv_has_label, cfg.bad_rows, skips)
        rows: List[tsv.Row] = []
        for _, _, row in tsv.iter_rows(seg, parser, lambda j: True):
            if row is not None:
                rows.append(row)
            if len(rows) == rows_per_chunk:
                yield tsv.rows_to_chunk(rows)
                rows = []
        if rows:
            yield tsv.rows_to_chunk(rows)
    if skips:
        logger.warning("%s: skipped %d bad rows: %s", split, sum(skips.values()), dict(skips))
