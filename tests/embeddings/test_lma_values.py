"""LMA's "values" semantic set: minhashes of the context values a value occurs with, own feature excluded, and
addresses that only values of one feature can share."""

from __future__ import annotations

import numpy as np
import torch

from embeddings.hashing import hash64
from embeddings.lma_minhash import CONTEXT_TAG, INT32_MAX, chunk_addresses, context_signatures


def _brute(keys, rows, features, context, functions, seed):  # type: ignore[no-untyped-def]
    """Per pair: min over the other context features' values in its row of hash_j(value) >> 33."""
    out = np.full((len(keys), functions), INT32_MAX, dtype=np.int64)
    for i, (r, f) in enumerate(zip(rows, features)):
        for k, rr, g in zip(keys, rows, features):
            if rr == r and g != f and context[g]:
                for j in range(functions):
                    h = int(hash64(torch.tensor([k]), j, seed, CONTEXT_TAG)[0]) >> 33
                    out[i, j] = min(out[i, j], h)
    return out


def test_context_signatures_match_the_definition() -> None:
    rng = np.random.default_rng(0)
    rows, features = [], []
    for r in range(6):  # multi-hot bags (feature 1 has two values in some rows), one row missing feature 2
        for f, n in ((0, 1), (1, 1 + r % 2), (2, 0 if r == 3 else 1), (3, 1)):
            rows += [r] * n
            features += [f] * n
    keys = rng.integers(-(2**62), 2**62, len(rows))
    rows_a, feats = np.array(rows), np.array(features)
    context = np.array([True, True, True, False])  # feature 3 is no context (e.g. too few distinct values)
    got = context_signatures(keys, rows_a, feats, 6, 4, 3, 7, context)
    np.testing.assert_array_equal(got, _brute(keys, rows_a, feats, context, 3, 7))


def test_same_context_same_feature_shares_and_other_features_do_not() -> None:
    """Two values of feature 0 seen with the same context values get equal signatures and addresses; the same
    signature under another feature lands elsewhere."""
    keys = np.array([11, 22, 33, 44], dtype=np.int64)  # values 11 and 22 (feature 0), each with 33 and 44
    rows = np.array([0, 0, 0, 1, 1, 1])
    feats = np.array([0, 1, 2, 0, 1, 2])
    pair_keys = np.array([11, 33, 44, 22, 33, 44], dtype=np.int64)
    sig = context_signatures(pair_keys, rows, feats, 2, 3, 2, 0, np.array([True, True, True]))
    assert (sig[0] == sig[3]).all() and keys.size == 4
    signatures = torch.from_numpy(np.stack([sig[0], sig[3], sig[0]]))
    rows_t = torch.tensor(1 << 40)
    addresses = chunk_addresses(signatures, 2, 0, rows_t, torch.tensor((1 << 64) % (1 << 40)),
                                features=torch.tensor([0, 0, 5]))
    assert addresses[0, 0] == addresses[1, 0] and addresses[0, 0] != addresses[2, 0]
    # without features (the paper's rows mode) the feature plays no part
    plain = chunk_addresses(signatures, 2, 0, rows_t, torch.tensor((1 << 64) % (1 << 40)))
    assert plain[0, 0] == plain[2, 0]
