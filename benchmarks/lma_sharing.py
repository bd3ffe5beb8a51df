"""Whom LMA makes share memory: values whose whole minhash signature of a chunk agrees share that chunk's row
(beyond the ~1/rows random collisions), so the groups of equal signatures are LMA's deliberate sharing.

For each index given: the share of indexed values in such a group, and how many groups hold values of one
feature only or of several. ``semantic_set: rows`` (the paper) can only group values of different features
(two values of one feature never occur in the same row); ``values`` groups values of one feature (its
addresses also mix in the feature, so a group spanning features is split by feature).

    PYTHONPATH=. .venv/bin/python benchmarks/lma_sharing.py runs/quality/lma_index_small.npz \\
        runs/quality/lma_values_index_small.npz
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np

from embeddings.lma_index import load_index


def sharing(path: str) -> str:
    index = load_index(path)
    header = index.header
    k = header.num_hashes
    signature = index.signatures[:, :k]  # chunk 0
    if header.semantic_set == "values":  # addresses mix in the feature: groups are per feature
        signature = np.concatenate([signature, index.features[:, None].astype(np.int32)], axis=1)
    _, group, size = np.unique(signature, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    shared = size[group] > 1
    features_of = {}
    for g, f in zip(group[shared], index.features[shared]):
        features_of.setdefault(int(g), set()).add(int(f))
    single = sum(1 for s in features_of.values() if len(s) == 1)
    return (f"{path}: semantic_set={header.semantic_set}, {len(index.keys):,} values indexed, "
            f"{shared.mean():.1%} of them share their chunk-0 signature; {len(features_of):,} groups, "
            f"{single:,} within one feature, {len(features_of) - single:,} across features")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("indexes", nargs="+", help="LMA index files (compactrec prepare / lma-index)")
    for path in p.parse_args(argv).indexes:
        print(sharing(path))


if __name__ == "__main__":
    main()
