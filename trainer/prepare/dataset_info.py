"""What the model needs to know about a dataset: feature names, full-table sizes, pooling factors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from trainer.config import Config
from trainer.data import loader
from trainer.data.manifest import MANIFEST, read_manifest

if TYPE_CHECKING:
    from embeddings.id_counts import IdCounts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    feature_names: List[str]
    num_embeddings_per_feature: Optional[List[int]]  # None: unknown, and the method needs none
    pooling_factors: Optional[List[float]]
    manifest: Optional[Dict[str, Any]]
    id_counts: Optional["IdCounts"] = None  # loaded when the config needs them (trainer.prepare.count_ids.needs_counts)


def dataset_info(config: Config, require_data: bool = True) -> DatasetInfo:
    """Table sizes come from ``embeddings.num_embeddings_per_feature``, or else (``embeddings.table_sizes``)
    the dataset manifest or the id counts of ``compactrec prepare`` (distinct training values + 1 per
    feature); the id counts are loaded, checked against the data, when the config needs them.

    ``require_data=False`` (planning) accepts a missing data directory when the config gives the sizes.
    """
    from trainer.prepare.count_ids import counts_path, load_checked_counts, needs_counts, sizes_from_counts

    names = list(loader.feature_names()[1])
    path = Path(config.data.path)
    if not path.exists() and (require_data or config.embeddings.num_embeddings_per_feature is None):
        raise FileNotFoundError(
            f"data.path {str(path)!r} does not exist; generate a synthetic dataset with "
            f"`compactrec generate small --out {path}` or point data.path at Criteo files"
        )
    manifest = read_manifest(path) if path.is_dir() else None
    from_counts = sizes_from_counts(config)
    use_counts = path.exists() and (needs_counts(config) or (from_counts == "optional"
                                                             and counts_path(config.data).is_file()))
    counts = load_checked_counts(config) if use_counts else None
    sizes = config.embeddings.num_embeddings_per_feature
    if sizes is None and from_counts != "no":
        if counts is None:  # "optional": the method needs no sizes, and no counts were built
            logger.info("no table sizes (config, %s or id counts): training without a compression ratio",
                        path / MANIFEST)
            return DatasetInfo(names, None, loader.pooling_factors(config.data), manifest, None)
        sizes = counts.table_sizes()
        where = f"id counts of {path} (distinct training values + 1)"
    elif sizes is None:
        if manifest is None or "num_embeddings_per_feature" not in manifest:
            raise ValueError(
                f"embeddings.num_embeddings_per_feature is null and {path / MANIFEST} gives no table sizes; "
                "set it in the config (e.g. the Criteo Kaggle or Terabyte sizes), or take them from the data "
                "with embeddings.table_sizes=counts and `compactrec prepare CONFIG`"
            )
        sizes = manifest["num_embeddings_per_feature"]
        where = f"{path / MANIFEST}: num_embeddings_per_feature"
    else:
        where = "embeddings.num_embeddings_per_feature"
    if not isinstance(sizes, list) or len(sizes) != len(names):
        raise ValueError(f"{where} must list {len(names)} table sizes, got {sizes!r}")
    bad = [(i, n) for i, n in enumerate(sizes) if isinstance(n, bool) or not isinstance(n, int) or n <= 0]
    if bad:
        i, n = bad[0]
        raise ValueError(f"{where}[{i}] ({names[i]}) must be a positive integer, got {n!r}")
    pooling = loader.pooling_factors(config.data) if path.exists() else None
    return DatasetInfo(names, list(sizes), pooling, manifest, counts)
