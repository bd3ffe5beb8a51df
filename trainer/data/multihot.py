"""MLPerf DLRMv2 multi-hot ids from one-hot Criteo days: on the fly (``MultiHotDay``) or materialised as npz.

Reference (read, not copied): facebookresearch/dlrm ``torchrec_dlrm/multi_hot.py`` (class ``Multihot`` in its
per-table form, since commit 16363d3 of Oct 2022) and ``torchrec_dlrm/scripts/
materialize_synthetic_multihot_dataset.py``, which wrote the MLPerf Training DLRM-DCNv2 dataset that
mlcommons/training ``recommendation_v2`` reads. Its semantics, for feature f with table size n_f and
multi-hot size s_f:

1. One lookup table per feature, built once, features in order 0..25, all from ONE legacy NumPy Mersenne
   Twister stream seeded with ``seed`` (reference: ``np.random.seed(0)``). Row r of table f is
   ``[r, e_1 .. e_{s_f - 1}]``; the extra ids of all n_f rows are one (n_f, s_f - 1) draw:
   uniform ``randint(0, n_f, size=(n_f, s_f - 1))``, pareto ``pareto(a=0.25, size=...).astype(int32) % n_f``.
   A feature with s_f = 1 draws nothing and stays one-hot.
2. A one-hot id x of feature f becomes the s_f ids ``table_f[x mod n_f]``, as int32: the id itself (mod n_f)
   followed by its fixed extra ids. The same id gets the same extras in every row, day and rank.
3. Materialised, day i is ``day_{i}_sparse_multi_hot.npz`` as ``np.savez`` writes it: an uncompressed zip
   of members "0.npy".."25.npy" (zip64 headers), member f an int32 C-order (N, s_f) array.

Differences from earlier prototypes of that code (dlrm commits 1472d21..4a9d018, Aug-Sep 2022): they used
one ``multi_hot_size`` for all tables, per-table seeds, and ``--multi_hot_min_table_size`` (default 200):
tables with fewer rows stayed one-hot; an earlier variant added offsets from a 100,000-row cache,
``(x + offset) % n``. ``min_table_size`` is kept as an option, default 0 (off) as in the final reference:
with 200, MLPerf's table 15 (155 rows, 5 ids per sample) would become one-hot.

Platform point: ``pareto(...).astype(int32)`` casts draws >= 2**31 out of range; NumPy on x86-64 gives
INT32_MIN for them (then ``% n_f`` makes a valid id). That value is produced explicitly here, so the result
does not depend on the machine (other CPUs may saturate instead; this is a guess about the reference's
machines, which were x86-64). Memory: the tables hold sum_f n_f * (s_f - 1) int32 ids, about 23 GB at the
full MLPerf sizes, as in the reference; for the real data materialise the npz files once instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from trainer.data.data_config import MULTI_HOT_DISTRIBUTIONS, DataConfig
from trainer.data.npy import NpyDay, day_path, open_array
from trainer.data.records import NUM_SPARSE, Chunk, DaySource

logger = logging.getLogger(__name__)

DISTRIBUTIONS = MULTI_HOT_DISTRIBUTIONS
PARETO_SHAPE = 0.25  # the reference's ``a``
#: Multi-hot sizes of the MLPerf DLRMv2 (Criteo Terabyte) benchmark, features 0..25: 214 ids per sample.
MLPERF_MULTI_HOT_SIZES: Tuple[int, ...] = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)  # fmt: skip
NPZ_SUFFIX = "sparse_multi_hot.npz"
_DRAW_ROWS = 1 << 20  # table rows drawn per step (bounds the float64/int64 temporaries)
_INT32_MIN = np.iinfo(np.int32).min


@dataclass(frozen=True)
class MultiHotSpec:
    """Everything that defines the multi-hot expansion (hashable: tables are cached per spec)."""

    sizes: Tuple[int, ...]  # ids per sample for each feature (1 = one-hot)
    num_embeddings: Tuple[int, ...]  # table size per feature: ids are reduced modulo it
    distribution: str = "uniform"
    seed: int = 0
    min_table_size: int = 0  # tables with fewer rows stay one-hot (0 = off, the reference's final form)

    def __post_init__(self) -> None:
        for name in ("sizes", "num_embeddings"):
            values = getattr(self, name)
            if len(values) != NUM_SPARSE or any(int(v) < 1 for v in values):
                raise ValueError(f"multi-hot {name}={list(values)!r}: expected {NUM_SPARSE} integers >= 1")
        if any(n > 2**31 for n in self.num_embeddings):
            raise ValueError(f"multi-hot num_embeddings={list(self.num_embeddings)!r}: ids are int32, "
                             "tables must have at most 2**31 rows")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"multi-hot distribution={self.distribution!r}: must be one of {list(DISTRIBUTIONS)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"multi-hot seed={self.seed!r}: must be in [0, 2**32) (NumPy legacy seed)")
        if self.min_table_size < 0:
            raise ValueError(f"multi-hot min_table_size={self.min_table_size!r}: must be >= 0")

    @property
    def effective_sizes(self) -> List[int]:
        """Ids per sample after the min-table-size rule."""
        return [1 if n < self.min_table_size else int(s) for s, n in zip(self.sizes, self.num_embeddings)]


def _draw(rs: np.random.RandomState, distribution: str, n: int, shape: Tuple[int, int]) -> np.ndarray:
    if distribution == "uniform":
        return rs.randint(0, n, size=shape).astype(np.int32)
    draws = rs.pareto(a=PARETO_SHAPE, size=shape)
    fits = draws < 2.0**31
    ids = np.where(fits, draws, 0.0).astype(np.int64)
    ids[~fits] = _INT32_MIN  # what x86-64 NumPy's out-of-range astype(int32) yields
    return np.mod(ids, n).astype(np.int32)


class MultiHotTables:
    """Per feature f the (n_f, s_f - 1) int32 extra ids of every table row (see the module doc)."""

    def __init__(self, spec: MultiHotSpec) -> None:
        self.spec = spec
        self.sizes = spec.effective_sizes
        self.num_embeddings = [int(n) for n in spec.num_embeddings]
        rs = np.random.RandomState(spec.seed)
        self.extras: List[np.ndarray] = []
        for n, s in zip(self.num_embeddings, self.sizes):
            table = np.empty((n, s - 1), dtype=np.int32)
            if s > 1:  # draws are element-sequential, so row blocks give the same ids as one (n, s-1) draw
                for a in range(0, n, _DRAW_ROWS):
                    b = min(n, a + _DRAW_ROWS)
                    table[a:b] = _draw(rs, spec.distribution, n, (b - a, s - 1))
            self.extras.append(table)
        nbytes = sum(t.nbytes for t in self.extras)
        logger.info("multi-hot tables built (%s, seed %d): %.1f MB", spec.distribution, spec.seed, nbytes / 2**20)

    def expand(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """One-hot ids (k,) of ``feature`` -> int32 (k, s_f): ``[x mod n_f, extras[x mod n_f]]`` per id."""
        n, s = self.num_embeddings[feature], self.sizes[feature]
        rows = np.mod(np.asarray(ids, dtype=np.int64), n)
        out = np.empty((rows.shape[0], s), dtype=np.int32)
        out[:, 0] = rows
        if s > 1:
            out[:, 1:] = self.extras[feature][rows]
        return out


@functools.lru_cache(maxsize=1)
def tables_for(spec: MultiHotSpec) -> MultiHotTables:
    """The tables of ``spec``, built once per process (every split and epoch reuses them)."""
    return MultiHotTables(spec)


def multi_hot_spec(cfg: DataConfig) -> Optional[MultiHotSpec]:
    """The spec of ``cfg`` (None when ``data.multi_hot_sizes`` is unset). Table sizes come from
    ``data.num_embeddings_per_feature`` or else ``manifest.json`` in ``data.path`` (synthetic datasets)."""
    if cfg.multi_hot_sizes is None:
        return None
    sizes = cfg.num_embeddings_per_feature
    if sizes is None:
        path = os.path.join(cfg.path, "manifest.json")
        manifest = {}
        if os.path.isfile(path):
            with open(path) as fin:
                try:
                    manifest = json.load(fin)
                except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
                    raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or "num_embeddings_per_feature" not in manifest:
            raise ValueError(f"data.multi_hot_sizes is set but no table sizes are known: set "
                             f"data.num_embeddings_per_feature (ids are taken modulo them; {path} gives none)")
        sizes = manifest["num_embeddings_per_feature"]
        # int() would turn 1.5 or "7" into a table size silently; bool is an int subclass
        if (not isinstance(sizes, list) or len(sizes) != NUM_SPARSE
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)):
            raise ValueError(f"{path}: num_embeddings_per_feature={sizes!r}: expected {NUM_SPARSE} integers >= 1")
    return MultiHotSpec(tuple(cfg.multi_hot_sizes), tuple(sizes), cfg.multi_hot_distribution,
                        cfg.multi_hot_seed, cfg.multi_hot_min_table_size)


class MultiHotDay(DaySource):
    """A one-hot day read as multi-hot: every id of feature f becomes its s_f ids (bags of length s_f)."""

    def __init__(self, one_hot: NpyDay, tables: MultiHotTables) -> None:
        self.one_hot, self.tables = one_hot, tables
        self.num_rows = one_hot.num_rows
        self.has_oracle = one_hot.has_oracle
        self.sizes = list(tables.sizes)

    def read(self, start: int, stop: int) -> Chunk:
        chunk = self.one_hot.read(start, stop)  # one id per feature per row, validated
        ids = [self.tables.expand(f, chunk.ids[f]).reshape(-1).astype(np.int64) for f in range(NUM_SPARSE)]
        lengths = np.repeat(np.asarray(self.sizes, dtype=np.int32)[:, None], chunk.num_rows, axis=1)
        return Chunk(dense=chunk.dense, labels=chunk.labels, ids=ids, lengths=lengths, oracle=chunk.oracle)


def _write_npz_member(zf: zipfile.ZipFile, name: str, shape: Tuple[int, int], blocks: Iterable[np.ndarray]) -> None:
    """Write member ``name``.npy exactly as ``np.savez`` does (zip64 header, .npy v1.0 header, C order),
    its int32 data arriving as row blocks."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": shape}
    rows = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as fid:
        np.lib.format.write_array_header_1_0(fid, header)
        for block in blocks:
            fid.write(np.ascontiguousarray(block, dtype=np.int32).tobytes())
            rows += block.shape[0]
    assert rows == shape[0], (name, rows, shape)


def _checked_expand(tables: MultiHotTables, feature: int, ids: np.ndarray, path: str, first_row: int) -> np.ndarray:
    if ids.size and ids.min() < 0:
        row = int(np.argmax(ids < 0))
        raise ValueError(f"{path}: row {first_row + row} column {feature}: id {int(ids[row])} is negative")
    return tables.expand(feature, ids)


def materialize_multihot(src_dir: str, days: Sequence[int], spec: MultiHotSpec, out_dir: Optional[str] = None,
                         copy_dense_labels: bool = True, overwrite: bool = False,
                         chunk_rows: int = 1 << 18) -> List[str]:
    """Write ``day_{i}_sparse_multi_hot.npz`` for each day from ``src_dir/day_{i}_sparse.npy``.

    ``out_dir`` defaults to ``src_dir``; when it differs and ``copy_dense_labels`` is set, the day's dense,
    labels (and oracle logits, if any) are copied beside the npz so that the directory reads as format "npz"
    (the reference script's ``--copy_labels_and_dense``). Streams ``chunk_rows`` rows at a time. Returns the
    names of the files written.
    """
    out = src_dir if out_dir is None else out_dir
    os.makedirs(out, exist_ok=True)
    tables = tables_for(spec)
    written: List[str] = []
    for day in days:
        src = day_path(src_dir, day, "sparse.npy")
        sparse = open_array(src)
        if sparse.ndim != 2 or sparse.shape[1] != NUM_SPARSE or not np.issubdtype(sparse.dtype, np.integer):
            raise ValueError(f"{src}: expected an integer array of shape (N, {NUM_SPARSE}), "
                             f"found {sparse.dtype} {sparse.shape}")
        target = day_path(out, day, NPZ_SUFFIX)
        if os.path.exists(target) and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        n = int(sparse.shape[0])
        partial = target + ".partial"
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f in range(NUM_SPARSE):
                blocks = (_checked_expand(tables, f, sparse[a : a + chunk_rows, f], src, a)
                          for a in range(0, n, chunk_rows))
                _write_npz_member(zf, str(f), (n, tables.sizes[f]), blocks)
        os.replace(partial, target)
        written.append(os.path.basename(target))
        if copy_dense_labels and os.path.abspath(out) != os.path.abspath(src_dir):
            for suffix in ("dense.npy", "labels.npy", "oracle_logits.npy"):
                if suffix == "oracle_logits.npy" and not os.path.exists(day_path(src_dir, day, suffix)):
                    continue
                shutil.copyfile(day_path(src_dir, day, suffix), day_path(out, day, suffix))
                written.append(os.path.basename(day_path(out, day, suffix)))
        logger.info("materialised %s (%d rows, %d ids per row)", target, n, sum(tables.sizes))
    return written

