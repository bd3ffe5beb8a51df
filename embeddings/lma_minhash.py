"""LMA's id maths as pure functions: value keys, minhash signatures, chunk addresses.

Definitions (``hash64``, ``hash_salt``, ``mix64``, unsigned ``mod``: ``embeddings.hashing``):

- Value identity is ``(feature index f, raw id x)`` in one global space across features; its 64-bit key is
  ``key(f, x) = hash64(x, f, KEY_SEED, 0)`` (a bijection of x for each f; keys of different features
  collide with probability ~2**-64 per pair). ``KEY_SEED`` is fixed, so keys do not depend on the run seed.
- The semantic set of a value is the set of sampled training rows it occurs in; sampled rows are numbered
  ``0..n-1`` in data order.
- Minhash function ``j`` is a random permutation of the sampled rows: row ``r`` has rank
  ``pi_j(r) = position of hash64(r, j, seed, PERMUTATION_TAG) in sorted order``. The signature of a set S is
  ``s_j(S) = min over r in S of pi_j(r)`` (int32), so ``Pr[s_j(A) = s_j(B)] = J(A, B)`` (Jaccard).
- ``semantic_set: values`` (this project's variant): the semantic set of value ``(f, x)`` is the set of values
  ``(g, y)``, ``g != f`` a context feature (one with at least ``context_min_values`` distinct values in the sample),
  that occur in a sampled row with it. Minhash ``j`` of it is the smallest ``h_j(g, y) = hash64(key(g, y), j, seed,
  CONTEXT_TAG) >>> 33`` (31 bits): values of one feature seen with the same context values share memory.
  Their addresses also mix in the feature index, so values of different features never share by meaning
  (with ``rows`` they do: co-occurring values of different features have overlapping row sets).
- Chunk ``c`` of a value uses minhashes ``j = c*K .. c*K + K - 1``, combined with ``c`` and the seed:
  ``a_0 = hash_salt(c, seed, ADDRESS_TAG)``, ``a_{k+1} = mix64(a_k ^ s_{cK+k})``, row ``= a_K mod rows``
  (unsigned). Two values share chunk ``c`` if all K minhashes agree (probability J**K) or, otherwise, by a
  collision of the final reduction (~1/rows): there is no intermediate reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from embeddings.remap import unsigned_mod_rows
from embeddings.hashing import hash64, hash_salt, mix64

KEY_SEED = 0x4C4D414B4559  # "LMAKEY"
PERMUTATION_TAG = 1
ADDRESS_TAG = 2
CONTEXT_TAG = 3
FEATURE_TAG = 4
SEMANTIC_SETS = ("rows", "values")
INT32_MAX = (1 << 31) - 1


def key_salts(num_features: int) -> torch.Tensor:
    """[F] int64: ``key(f, x) = mix64(x ^ key_salts[f])``, the same as ``hash64(x, f, KEY_SEED, 0)``."""
    return hash_salt(torch.arange(num_features, dtype=torch.int64), KEY_SEED, 0)


def value_keys(ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """64-bit keys of raw ids ``ids`` of feature indices ``features`` (broadcast)."""
    return hash64(ids.to(torch.int64), features.to(torch.int64), KEY_SEED, 0)


def row_ranks(num_rows: int, num_functions: int, seed: int) -> np.ndarray:
    """[n, H] int32: rank of each sampled row under each of the H minhash permutations."""
    rows = torch.arange(num_rows, dtype=torch.int64)
    ranks = np.empty((num_rows, num_functions), dtype=np.int32)
    positions = np.arange(num_rows, dtype=np.int32)
    for j in range(num_functions):
        order = torch.argsort(hash64(rows, j, seed, PERMUTATION_TAG)).numpy()
        ranks[order, j] = positions
    return ranks


@dataclass
class Signatures:
    """Per value, sorted by key: minhash signatures and how often it occurred in the sampled rows."""

    keys: np.ndarray  # [V] int64, strictly increasing
    signatures: np.ndarray  # [V, H] int32
    features: np.ndarray  # [V] int16 feature index
    counts: np.ndarray  # [V] int32 occurrences in sampled rows

    @staticmethod
    def empty(num_functions: int) -> "Signatures":
        return Signatures(np.empty(0, np.int64), np.empty((0, num_functions), np.int32), np.empty(0, np.int16),
                          np.empty(0, np.int32))

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def _reduce(keys: np.ndarray, signatures: np.ndarray, features: np.ndarray, counts: np.ndarray) -> Signatures:
    """Group rows by key: elementwise minimum of signatures, summed counts (sort-reduce)."""
    if keys.shape[0] == 0:
        return Signatures(keys.astype(np.int64), signatures, features, counts)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return Signatures(
        keys=keys[starts],
        signatures=np.minimum.reduceat(signatures[order], starts, axis=0),
        features=features[order][starts],
        counts=np.add.reduceat(counts[order], starts).astype(np.int32),
    )


def merge(a: Signatures, b: Signatures) -> Signatures:
    """Signatures of the union of the (key, row) pairs behind ``a`` and ``b``."""
    return _reduce(np.concatenate([a.keys, b.keys]), np.concatenate([a.signatures, b.signatures]),
                   np.concatenate([a.features, b.features]), np.concatenate([a.counts, b.counts]))


class SignatureAccumulator:
    """Streams (value key, sampled row, feature) pairs and keeps per-value minhash signatures.

    Memory: the signatures of the values seen so far plus at most ``max_pairs`` buffered pairs; the
    buffer is reduced and merged whenever it fills (sets are never materialised).
    """

    def __init__(self, ranks: np.ndarray, max_pairs: int = 1 << 20) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
        self.ranks = ranks
        self.max_pairs = max_pairs
        self._result = Signatures.empty(ranks.shape[1])
        self._pending: List[np.ndarray] = []
        self._pending_pairs = 0
        self.merges = 0

    def add_signatures(self, keys: np.ndarray, signatures: np.ndarray, features: np.ndarray) -> None:
        """Pairs given by their own signature contribution ([n, H] int32) instead of a sampled row."""
        self._result = merge(self._result, _reduce(keys.astype(np.int64), signatures.astype(np.int32),
                                                   features.astype(np.int16), np.ones(keys.shape[0], np.int32)))
        self.merges += 1

    def add(self, keys: np.ndarray, rows: np.ndarray, features: np.ndarray) -> None:
        """Pairs: value ``keys[i]`` (int64) of feature ``features[i]`` occurs in sampled row ``rows[i]``."""
        if not keys.shape[0] == rows.shape[0] == features.shape[0]:
            raise ValueError("keys, rows and features must have one entry per pair")
        self._pending.append(np.stack([keys.astype(np.int64), rows.astype(np.int64), features.astype(np.int64)]))
        self._pending_pairs += int(keys.shape[0])
        if self._pending_pairs >= self.max_pairs:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        keys, rows, features = np.concatenate(self._pending, axis=1)
        self._pending, self._pending_pairs = [], 0
        batch = _reduce(keys, self.ranks[rows], features.astype(np.int16), np.ones(keys.shape[0], np.int32))
        self._result = merge(self._result, batch)
        self.merges += 1

    def result(self) -> Signatures:
        self._flush()
        return self._result


def context_signatures(keys: np.ndarray, rows: np.ndarray, features: np.ndarray, num_rows: int, num_features: int,
                       num_functions: int, seed: int, context: np.ndarray) -> np.ndarray:
    """[n, H] int32 contribution of each (value key, sampled row, feature) pair under ``semantic_set: values``:
    per function, the smallest hash of the context features' values in the pair's row, its own feature excluded
    (``INT32_MAX`` when the row has no other context value). ``context`` [F] bool marks the context features."""
    hashes = np.stack([(hash64(torch.from_numpy(keys), j, seed, CONTEXT_TAG) >> 33).numpy()
                       for j in range(num_functions)], axis=1).astype(np.int64)  # [n, H], in [0, 2**31)
    per_bag = np.full((num_rows, num_features, num_functions), INT32_MAX, dtype=np.int64)
    in_context = context[features]
    for j in range(num_functions):  # a multi-hot bag contributes its smallest value hash
        np.minimum.at(per_bag[:, :, j], (rows[in_context], features[in_context]), hashes[in_context, j])
    order = np.argsort(per_bag, axis=1, kind="stable")
    first = np.take_along_axis(per_bag, order[:, :1], axis=1)[:, 0]  # [R, H]
    second = np.take_along_axis(per_bag, order[:, 1:2], axis=1)[:, 0] if num_features > 1 else first
    own_is_first = order[rows, 0, :] == features[:, None]
    return np.where(own_is_first, second[rows], first[rows]).astype(np.int32)


def set_signatures(sets: Sequence[np.ndarray], ranks: np.ndarray) -> np.ndarray:
    """[S, H] int32 minhash signatures of explicit sets of sampled rows (a reference for tests)."""
    return np.stack([ranks[np.asarray(s, dtype=np.int64)].min(axis=0) for s in sets]).astype(np.int32)


def chunk_addresses(signatures: torch.Tensor, num_hashes: int, seed: int, rows: torch.Tensor,
                    wrap: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[V, C] int64 rows of the C chunks of V values from their [V, C*K] signatures.

    ``rows`` / ``wrap`` ([V] or scalar tensors): table rows of each value's group and ``2**64 mod rows``.
    ``features`` ([V], ``semantic_set: values``): mixed into every address, so only values of one feature share.
    """
    count, width = signatures.shape
    if width % num_hashes:
        raise ValueError(f"signature width {width} is not a multiple of K={num_hashes}")
    chunks = width // num_hashes
    sig = signatures.to(torch.int64).view(count, chunks, num_hashes)
    acc = hash_salt(torch.arange(chunks, dtype=torch.int64), seed, ADDRESS_TAG).to(sig.device)
    acc = acc[None, :].expand(count, chunks)
    if features is not None:
        acc = acc ^ hash_salt(features.to(torch.int64), seed, FEATURE_TAG)[:, None]
    for k in range(num_hashes):
        acc = mix64(acc ^ sig[:, :, k])
    rows = rows.to(torch.int64).reshape(-1, 1) if rows.dim() else rows
    wrap = wrap.to(torch.int64).reshape(-1, 1) if wrap.dim() else wrap
    return unsigned_mod_rows(acc, rows, wrap)
