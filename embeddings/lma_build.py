"""LMA's data artifact: build the minhash index from the training data and check an existing one against the
options and the data - the :class:`~embeddings.types.ArtifactHooks` of the ``lma`` spec (``compactrec prepare``
runs them; ``compactrec lma-index`` builds one to a given path).

Sampling does not depend on how training batches the data: ``sample_rows`` rows (capped by the rows of the
training split) are drawn uniformly without replacement with ``numpy.random.default_rng(seed)`` among *all*
rows of the split (``TrainingData.batches``: the days in order, no batch size, ranks or ``limit_train_batches``);
sampled row ``i`` (in data order) is element ``i`` of every semantic set. One pass over the rows stops after the
last sampled row. For each chunk of rows the (value, sampled row) pairs are hashed to value keys and fed to
``embeddings.lma_minhash.SignatureAccumulator`` (sort-reduce, merged every ``max_pairs`` pairs): memory is the
signatures of the values seen plus one bounded buffer.

Provenance (:mod:`embeddings.provenance`): the header records the data fingerprint of the training split and every
option that shaped the index (seed, chunks, minhashes, key seed, features, ``min_count``, ``sample_rows``).
:func:`index_differences` compares them with the options: ``prepare`` rebuilds a differing index (logged),
training stops with :class:`~embeddings.provenance.ArtifactMismatch` naming each field and the rebuild command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.hashing import mix64
from embeddings.lma_index import IndexHeader, LmaIndex, read_header, save_index, verify_index
from embeddings.lma_minhash import KEY_SEED, SignatureAccumulator, context_signatures, key_salts, row_ranks
from embeddings.provenance import check_provenance, differences
from embeddings.types import ArtifactHooks, TrainingData


def num_chunks(embedding_dim: int, options: Any) -> int:
    chunk = options.chunk_size or embedding_dim
    if embedding_dim % chunk:
        raise ValueError(f"embeddings.options.chunk_size={chunk} must divide model.embedding_dim={embedding_dim}")
    return embedding_dim // chunk


def shaping_options(options: Any, chunks: int, feature_names: Sequence[str]) -> Dict[str, Any]:
    """Every option an index depends on (what a header records and a config must match)."""
    return {"seed": options.seed, "num_chunks": chunks, "num_hashes": options.num_hashes, "key_seed": KEY_SEED,
            "feature_names": list(feature_names), "min_count": options.min_count,
            "sample_rows": options.sample_rows, "semantic_set": options.semantic_set,
            "context_min_values": options.context_min_values}


def recorded_provenance(header: IndexHeader) -> Dict[str, Any]:
    """What an index header says it was built from and with."""
    return {"options": {"seed": header.seed, "num_chunks": header.num_chunks, "num_hashes": header.num_hashes,
                        "key_seed": header.key_seed, "feature_names": list(header.feature_names),
                        "min_count": header.min_count, "sample_rows": header.sample_rows,
                        "semantic_set": header.semantic_set, "context_min_values": header.context_min_values},
            "source": header.source}


def expected_provenance(options: Any, data: TrainingData) -> Dict[str, Any]:
    """What an index for ``options`` over ``data`` must record: its options and the data's fingerprint."""
    return {"options": shaping_options(options, num_chunks(data.embedding_dim, options), data.feature_names),
            "source": data.fingerprint()}


def index_differences(options: Any, data: TrainingData) -> Optional[List[str]]:
    """None when the configured index is missing, else the fields where it differs from the options and data
    ([] = up to date). An unreadable index or one of another format version is one difference."""
    path = options.index_path
    if path is None or not Path(path).is_file():
        return None
    try:
        header = read_header(path)
        verify_index(path)  # a damaged index is rebuilt
    except ValueError as exc:
        return [str(exc)]
    return differences(recorded_provenance(header), expected_provenance(options, data))


def check_index(options: Any, data: TrainingData, rebuild_command: str) -> None:
    """Raise unless the configured index exists and matches the options and the data (naming the rebuild)."""
    path = options.index_path
    if path is None:
        raise ValueError("embeddings.options.index_path is not set: LMA needs the minhash index of the training "
                         f"data; build it with `{rebuild_command}`")
    if not Path(path).is_file():
        raise FileNotFoundError(f"LMA index {path} does not exist; build it with `{rebuild_command}`")
    try:
        header = read_header(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; rebuild it with `{rebuild_command}`") from exc
    check_provenance(path, recorded_provenance(header), expected_provenance(options, data), rebuild_command,
                     what="LMA index")


def build_index_from_batches(batches: Iterable[KeyedJaggedTensor], num_rows: int, feature_names: Sequence[str],
                             options: Any, chunks: int, source: Optional[Dict[str, Any]] = None,
                             max_pairs: int = 1 << 20) -> LmaIndex:
    """The index of a stream of KJTs of raw ids (rows in data order, any batch sizes) holding ``num_rows`` rows.

    For library use without a CompactRec config (``source`` describes the data in the header). The result is
    the same for any cut of the rows into batches.
    """
    features = list(feature_names)
    count = min(options.sample_rows, num_rows)
    if count == 0:
        raise ValueError("no rows to sample the LMA index from")
    sample = np.sort(np.random.default_rng(options.seed).choice(num_rows, size=count, replace=False))
    functions = chunks * options.num_hashes
    by_values = options.semantic_set == "values"
    # rows: pairs stream into the accumulator; values: the sampled pairs are kept (their row's other values decide)
    accumulator = SignatureAccumulator(row_ranks(count, functions, options.seed) if not by_values
                                       else np.empty((0, functions), np.int32), max_pairs)
    pairs: List[np.ndarray] = []
    salts = key_salts(len(features))
    offset = 0
    for kjt in batches:
        if kjt.keys() != features:
            raise ValueError(f"batches have sparse features {kjt.keys()}, expected {features}")
        size = kjt.stride()
        lo, hi = np.searchsorted(sample, [offset, offset + size])
        if hi > lo:
            row_to_sample = torch.full((size,), -1, dtype=torch.int64)
            row_to_sample[torch.from_numpy(sample[lo:hi] - offset)] = torch.arange(int(lo), int(hi))
            lengths = kjt.lengths().to(torch.int64)
            rows = torch.arange(size, dtype=torch.int64).repeat(len(features))
            sampled = row_to_sample[torch.repeat_interleave(rows, lengths)]
            feature = torch.repeat_interleave(torch.arange(len(features)), lengths.view(len(features), -1).sum(1))
            keep = sampled >= 0
            values, feature, sampled = kjt.values().to(torch.int64)[keep], feature[keep], sampled[keep]
            keys = mix64(values ^ salts[feature]).numpy()
            if by_values:
                pairs.append(np.stack([keys, sampled.numpy(), feature.numpy()]))
            else:
                accumulator.add(keys, sampled.numpy(), feature.numpy())
        offset += size
        if offset > sample[-1]:
            break
    if offset <= sample[-1]:
        raise ValueError(f"the data ended after {offset} rows, before sampled row {int(sample[-1])} of {num_rows} "
                         "(did a file change while it was read?)")
    if by_values:
        all_pairs = np.concatenate(pairs, axis=1) if pairs else np.empty((3, 0), np.int64)
        pair_keys, rows, feats = all_pairs[0], all_pairs[1], all_pairs[2]
        distinct = np.array([np.unique(pair_keys[feats == f]).size for f in range(len(features))])
        context = distinct >= options.context_min_values
        if int(context.sum()) < 2:
            raise ValueError(f"semantic_set 'values' needs at least 2 context features with >= "
                             f"{options.context_min_values} distinct values in the sample, found {int(context.sum())} "
                             f"({dict(zip(features, distinct.tolist()))}); lower embeddings.options.context_min_values")
        accumulator.add_signatures(pair_keys, context_signatures(pair_keys, rows, feats, count, len(features),
                                                                 functions, options.seed, context), feats)
    signatures = accumulator.result()
    keep_values = signatures.counts >= options.min_count
    header = IndexHeader(
        seed=options.seed, num_chunks=chunks, num_hashes=options.num_hashes, key_seed=KEY_SEED,
        feature_names=features, rows_sampled=count, rows_available=num_rows, values_seen=len(signatures),
        values_covered=int(keep_values.sum()), min_count=options.min_count, sample_rows=options.sample_rows,
        semantic_set=options.semantic_set, context_min_values=options.context_min_values,
        values_per_feature=np.bincount(signatures.features[keep_values], minlength=len(features)).tolist(),
        source=dict(source or {}), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return LmaIndex(header, signatures.keys[keep_values], signatures.signatures[keep_values],
                    signatures.features[keep_values], signatures.counts[keep_values])


def build_index(options: Any, data: TrainingData, max_pairs: int = 1 << 20) -> LmaIndex:
    """Sample rows of the training split and compute every value's minhash signatures (module docstring)."""
    chunks = num_chunks(data.embedding_dim, options)
    source = data.fingerprint()  # before reading: a file changed meanwhile is then stale
    rows = data.num_rows()
    if rows == 0:
        raise ValueError(f"no training rows to sample: {data.where} is empty")
    return build_index_from_batches(data.batches(), rows, data.feature_names, options, chunks, source, max_pairs)


def write_index(options: Any, data: TrainingData, out: str) -> str:
    """Build the index and write it to ``out``; returns a summary to print."""
    start = time.perf_counter()
    index = build_index(options, data)
    written = save_index(index, out)
    h = index.header
    dictionary = h.values_covered * (8 + 4 * h.num_chunks)
    return (f"LMA index {written}: {h.values_covered:,} values covered ({h.values_seen:,} seen, min_count "
            f"{h.min_count}) from {h.rows_sampled:,} sampled of {h.rows_available:,} training rows; "
            f"{h.num_chunks} chunk(s) x {h.num_hashes} minhashes, seed {h.seed}; "
            f"file {Path(written).stat().st_size:,} B, dictionary kept at training {dictionary:,} B; "
            f"{time.perf_counter() - start:.1f} s")


HOOKS = ArtifactHooks(name="LMA index", path_option="embeddings.options.index_path", path=lambda options: options.index_path, build=write_index,
                      differences=index_differences, check=check_index)
