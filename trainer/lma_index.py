"""``compactrec lma-index``: build LMA's minhash index artifact from the training split.

One pass over the training rows with the data loader (rank 0 of 1, the configured batch size), stopping
after the last sampled row. ``sample_rows`` rows (capped by the rows available: whole batches, as training
sees them) are drawn uniformly without replacement with ``numpy.random.default_rng(seed)``; sampled row
``i`` (in data order) is element ``i`` of every semantic set. For each batch the (value, sampled row) pairs
are hashed to value keys and fed to ``embeddings.lma_minhash.SignatureAccumulator``, which keeps per-value
signatures by sort-reduce (``np.minimum.reduceat``) and merges every ``max_pairs`` pairs: memory is the
signatures of the values seen plus one bounded buffer, never a set per value.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from embeddings.hashing import mix64
from embeddings.lma import LmaOptions
from embeddings.lma_index import IndexHeader, LmaIndex, save_index
from embeddings.lma_minhash import KEY_SEED, SignatureAccumulator, key_salts, row_ranks
from trainer.config import Config
from trainer.data import loader
from trainer.strict import from_dict

logger = logging.getLogger(__name__)


def lma_options(config: Config) -> LmaOptions:
    if config.embeddings.kind != "lma":
        raise ValueError(f"embeddings.kind is {config.embeddings.kind!r}: `compactrec lma-index` builds the index "
                         "of an lma config (embeddings.kind: lma)")
    return from_dict(LmaOptions, config.embeddings.options, source="config", prefix="embeddings.options")


def _rows_available(config: Config, stream: loader.BatchStream) -> int:
    batch = config.data.batch_size
    if stream.num_batches is not None:
        return stream.num_batches * batch
    batches = loader.count_rows(config.data, "train") // batch
    if config.data.limit_train_batches is not None:
        batches = min(batches, config.data.limit_train_batches)
    return batches * batch


def build_lma_index(config: Config, options: LmaOptions, max_pairs: int = 1 << 20) -> LmaIndex:
    """Sample training rows and compute every value's minhash signatures (see the module docstring)."""
    features = loader.feature_names()[1]
    dim = config.model.embedding_dim
    chunk = options.chunk_size or dim
    if dim % chunk:
        raise ValueError(f"embeddings.options.chunk_size={chunk} must divide model.embedding_dim={dim}")
    num_chunks = dim // chunk
    stream = loader.make_batches(config.data, "train", 0, 1)
    available = _rows_available(config, stream)
    count = min(options.sample_rows, available)
    if count == 0:
        raise ValueError(f"no training rows to sample: the train split of {config.data.path} has fewer rows than "
                         f"one batch ({config.data.batch_size})")
    sample = np.sort(np.random.default_rng(options.seed).choice(available, size=count, replace=False))
    accumulator = SignatureAccumulator(row_ranks(count, num_chunks * options.num_hashes, options.seed), max_pairs)
    salts = key_salts(len(features))
    offset = 0
    for batch in stream:
        kjt = batch.sparse_features
        if kjt.keys() != features:
            raise ValueError(f"training batches have sparse features {kjt.keys()}, expected {features}")
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
            accumulator.add(mix64(values ^ salts[feature]).numpy(), sampled.numpy(), feature.numpy())
        offset += size
        if offset > sample[-1]:
            break
    if offset <= sample[-1]:
        raise ValueError(f"training data ended after {offset} rows, before sampled row {int(sample[-1])} "
                         "(did a file change while it was read?)")
    signatures = accumulator.result()
    keep_values = signatures.counts >= options.min_count
    header = IndexHeader(
        seed=options.seed, num_chunks=num_chunks, num_hashes=options.num_hashes, key_seed=KEY_SEED,
        feature_names=list(features), rows_sampled=count, rows_available=available, values_seen=len(signatures),
        values_covered=int(keep_values.sum()), min_count=options.min_count,
        values_per_feature=np.bincount(signatures.features[keep_values], minlength=len(features)).tolist(),
        source={"path": str(config.data.path), "format": config.data.format, "train_days": list(config.data.train_days),
                "batch_size": config.data.batch_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    return LmaIndex(header, signatures.keys[keep_values], signatures.signatures[keep_values],
                    signatures.features[keep_values], signatures.counts[keep_values])


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
