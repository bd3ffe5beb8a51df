"""``compactrec lma-index`` / ``prepare``: build LMA's minhash index artifact from the training split, and
check an existing one against the config and the data.

Sampling does not depend on how training batches the data: ``sample_rows`` rows (capped by the rows of the
training split) are drawn uniformly without replacement with ``numpy.random.default_rng(seed)`` among *all*
rows of the split (the days in order, ``loader.iter_split_chunks``: no batch size, ranks or
``limit_train_batches``); sampled row ``i`` (in data order) is element ``i`` of every semantic set. One pass over the rows stops after
the last sampled row. For each chunk of rows the (value, sampled row) pairs are hashed to value keys and fed to
``embeddings.lma_minhash.SignatureAccumulator`` (sort-reduce, merged every ``max_pairs`` pairs): memory is the
signatures of the values seen plus one bounded buffer.

Provenance (``trainer.prepare.provenance``): the header records the data fingerprint of the training split and every
option that shaped the index (seed, chunks, minhashes, key seed, features, ``min_count``, ``sample_rows``).
:func:`index_differences` compares them with the config: ``prepare`` rebuilds a differing index (logged),
training stops with :class:`~trainer.prepare.provenance.ArtifactMismatch` naming each field and the rebuild command.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.hashing import mix64
from embeddings.lma import LmaOptions
from embeddings.lma_index import IndexHeader, LmaIndex, read_header, save_index
from embeddings.lma_minhash import KEY_SEED, SignatureAccumulator, context_signatures, key_salts, row_ranks
from trainer.prepare.provenance import check_provenance, data_fingerprint, differences
from trainer.config import Config
from trainer.data import loader
from trainer.strict import from_dict

logger = logging.getLogger(__name__)

#: How ``compactrec train`` names the rebuild when it does not know the command line of the run.
REBUILD = "compactrec prepare CONFIG [the run's overrides]"


def lma_options(config: Config) -> LmaOptions:
    if config.embeddings.kind != "lma":
        raise ValueError(f"embeddings.kind is {config.embeddings.kind!r}: `compactrec lma-index` builds the index "
                         "of an lma config (embeddings.kind: lma)")
    return from_dict(LmaOptions, config.embeddings.options, source="config", prefix="embeddings.options")


def num_chunks(config: Config, options: LmaOptions) -> int:
    dim = config.model.embedding_dim
    chunk = options.chunk_size or dim
    if dim % chunk:
        raise ValueError(f"embeddings.options.chunk_size={chunk} must divide model.embedding_dim={dim}")
    return dim // chunk


def shaping_options(options: LmaOptions, chunks: int, feature_names: Sequence[str]) -> Dict[str, Any]:
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


def expected_provenance(config: Config, options: LmaOptions) -> Dict[str, Any]:
    """What an index for ``config`` must record: its options and the fingerprint of the training split."""
    features = loader.feature_names()[1]
    return {"options": shaping_options(options, num_chunks(config, options), features),
            "source": data_fingerprint(config.data, "train")}


def index_differences(config: Config) -> Optional[List[str]]:
    """None when the configured index is missing, else the fields where it differs from the config and data
    ([] = up to date). An unreadable index or one of another format version is one difference."""
    options = lma_options(config)
    path = options.index_path
    if path is None or not Path(path).is_file():
        return None
    try:
        header = read_header(path)
    except ValueError as exc:
        return [str(exc)]
    return differences(recorded_provenance(header), expected_provenance(config, options))


def check_index(config: Config, rebuild_command: str = REBUILD) -> None:
    """Raise unless the configured index exists and matches the config and the data (naming the rebuild)."""
    options = lma_options(config)
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
    check_provenance(path, recorded_provenance(header), expected_provenance(config, options), rebuild_command,
                     what="LMA index")


def build_index_from_batches(batches: Iterable[KeyedJaggedTensor], num_rows: int, feature_names: Sequence[str],
                             options: LmaOptions, chunks: int, source: Optional[Dict[str, Any]] = None,
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


def build_lma_index(config: Config, options: LmaOptions, max_pairs: int = 1 << 20) -> LmaIndex:
    """Sample rows of the training split and compute every value's minhash signatures (module docstring)."""
    chunks = num_chunks(config, options)
    source = data_fingerprint(config.data, "train")  # before reading: a file changed meanwhile is then stale
    rows = loader.count_rows(config.data, "train")
    if rows == 0:
        raise ValueError(f"no training rows to sample: the train split of {config.data.path} is empty")
    batches = (chunk.to_batch().sparse_features for chunk in loader.iter_split_chunks(config.data, "train"))
    return build_index_from_batches(batches, rows, loader.feature_names()[1], options, chunks, source, max_pairs)


def run_lma_index(config: Config, out: Optional[str] = None) -> str:
    """Build the index of ``config`` and write it to ``out`` (default ``embeddings.options.index_path``);
    returns a summary to print."""
    options = lma_options(config)
    path = out or options.index_path
    if path is None:
        raise ValueError("no output path: pass --out PATH or set embeddings.options.index_path")
    start = time.perf_counter()
    index = build_lma_index(config, options)
    written = save_index(index, path)
    h = index.header
    dictionary = h.values_covered * (8 + 4 * h.num_chunks)
    return (f"LMA index {written}: {h.values_covered:,} values covered ({h.values_seen:,} seen, min_count "
            f"{h.min_count}) from {h.rows_sampled:,} sampled of {h.rows_available:,} training rows; "
            f"{h.num_chunks} chunk(s) x {h.num_hashes} minhashes, seed {h.seed}; "
            f"file {Path(written).stat().st_size:,} B, dictionary kept at training {dictionary:,} B; "
            f"{time.perf_counter() - start:.1f} s")
