"""The fingerprint of a data split: what ``compactrec prepare``'s artifacts (LMA index, id frequencies,
vocabularies) record of the data they were built from (the comparison itself: ``embeddings.provenance``).

An artifact derived from the training split records, in its header, *where it came from* (the data source:
format, directory, days, every file read with its size and modification time) and *every option that shaped
it*. Whoever uses the artifact recomputes both from the current config and compares: ``prepare`` rebuilds on a
mismatch, training stops with an error naming each differing field and the rebuild command. An artifact built
from other data is therefore never used silently.

The fingerprint uses file sizes and modification times, not content hashes: reading a multi-GB day to hash it
would cost as much as the pass that built the artifact. Copying a dataset (new mtimes) makes artifacts stale,
which costs a rebuild, never a wrong result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from trainer.data.data_config import DataConfig
from trainer.data.multihot import NPZ_SUFFIX
from trainer.data.npy import day_path


def _file_entry(path: str) -> List[Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return [os.path.basename(path), int(st.st_size), int(st.st_mtime_ns)]


def split_files(data: DataConfig, split: str = "train") -> List[str]:
    """The files a split of ``data`` is read from (existing ones; a missing required file is an error)."""
    days = list(data.train_days) if split == "train" else [data.eval_day]
    if data.format == "tsv":
        if data.kaggle_file is not None:
            return [os.path.join(data.path, data.kaggle_file)]
        return [os.path.join(data.path, f"day_{d}") for d in days]
    if data.kaggle_file is not None:  # TorchRec's Kaggle arrays: one stem, cut into days by row count
        return [day_path(data.path, data.kaggle_file, f"{part}.npy") for part in ("sparse", "dense", "labels")]
    files: List[str] = []
    for d in days:
        npz = day_path(data.path, d, NPZ_SUFFIX)
        if data.format == "npz" and os.path.exists(npz):
            files.append(npz)
        else:
            files.append(day_path(data.path, d, "sparse.npy"))
        files += [day_path(data.path, d, "dense.npy"), day_path(data.path, d, "labels.npy")]
    return files


def data_fingerprint(data: DataConfig, split: str = "train") -> Dict[str, Any]:
    """JSON-ready description of the data a split is read from: equal fingerprints mean the same bytes
    (unless a file was rewritten in place with the same size within the filesystem's mtime resolution)."""
    source: Dict[str, Any] = {
        "format": data.format,
        "path": str(Path(data.path).resolve()),
        "days": list(data.train_days) if split == "train" else [data.eval_day],
        "files": [_file_entry(f) for f in split_files(data, split)],
    }
    if data.kaggle_file is not None:
        source.update(kaggle_file=data.kaggle_file, num_days=data.num_days)
    if data.format == "tsv":
        source["bad_rows"] = data.bad_rows
    if data.multi_hot_sizes is not None:
        source["multi_hot"] = {
            "sizes": list(data.multi_hot_sizes), "distribution": data.multi_hot_distribution,
            "seed": data.multi_hot_seed, "min_table_size": data.multi_hot_min_table_size,
            "num_embeddings": None if data.num_embeddings_per_feature is None else list(data.num_embeddings_per_feature),
        }
    return source


__all__: Sequence[str] = ["data_fingerprint", "split_files"]
