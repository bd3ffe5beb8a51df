"""The id-counting pass of ``compactrec prepare``: how often each raw id of each feature occurs in training.

One streamed pass over every row of the training split (``trainer.data.loader.iter_split_chunks``: all
formats, no batching, so the result does not depend on batch size or world size) into
``embeddings.id_counts.FrequencyCounter`` (at most ``data.counts_capacity`` values per feature: bounded
memory at any data size). The artifact (``data.counts_path``, default ``<data.path>/id_counts.npz``) records
its provenance, the data fingerprint and the counting options (``trainer.prepare.fingerprint``): ``prepare`` rebuilds a
stale one, training refuses it naming what differs.

Who needs it (:func:`needs_counts`): hot rows (``embeddings.options.hot_share > 0``), ``full`` with
``ids: vocabulary``, and table sizes taken from the data (``embeddings.table_sizes: counts``, or ``auto``
without sizes in the config or the manifest when the method needs sizes). A method that needs no sizes
(raw hashed ids, sized in rows) trains without them under ``auto``: its compression ratio is then reported
only if the counts exist anyway.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

from embeddings import registry
from embeddings.id_counts import BUILD_COMMAND, FrequencyCounter, IdCounts, load_counts, read_header
from embeddings.provenance import ArtifactMismatch, check_provenance, differences
from trainer.prepare.fingerprint import data_fingerprint
from trainer.config import Config
from trainer.data import loader
from trainer.data.data_config import DataConfig
from trainer.data.manifest import read_manifest
from trainer.strict import from_dict

logger = logging.getLogger(__name__)
DEFAULT_NAME = "id_counts.npz"


def counts_path(data: DataConfig) -> Path:
    return Path(data.counts_path) if data.counts_path is not None else Path(data.path) / DEFAULT_NAME


def provenance(data: DataConfig) -> Dict[str, Any]:
    """What the counts depend on: the training data and the counting options."""
    return {"source": data_fingerprint(data, "train"), "options": {"capacity": data.counts_capacity}}


def manifest_has_sizes(data: DataConfig) -> bool:

    manifest = read_manifest(Path(data.path)) if Path(data.path).is_dir() else None
    return manifest is not None and "num_embeddings_per_feature" in manifest


def _spec_options(config: Config) -> Any:
    spec = registry.get(config.embeddings.kind)
    return spec, from_dict(spec.options_type, config.embeddings.options, source="config", prefix="embeddings.options")


def sizes_from_counts(config: Config) -> str:
    """Whether the full tables' sizes come from the id counts: "required" (``table_sizes: counts``, or ``auto``
    with no sizes in the config nor the manifest of an existing data directory, for a method that needs
    sizes), "optional" (the same for a method that needs none: used when the counts exist) or "no"."""
    emb = config.embeddings
    if emb.num_embeddings_per_feature is not None or emb.table_sizes == "manifest":
        return "no"
    if emb.table_sizes == "counts":
        return "required"
    if not Path(config.data.path).is_dir() or manifest_has_sizes(config.data):
        return "no"
    spec, options = _spec_options(config)
    return "required" if spec.needs_table_sizes(options) else "optional"


def needs_counts(config: Config) -> bool:
    """Whether building this config's model needs the id counts (``prepare`` builds them then)."""
    spec, options = _spec_options(config)
    return spec.needs_id_counts(options) or sizes_from_counts(config) == "required"


def count_ids(data: DataConfig, rows_per_chunk: int = 1 << 16) -> IdCounts:
    """One pass over the training split (see the module doc)."""
    names = loader.feature_names()[1]
    counter = FrequencyCounter(len(names), data.counts_capacity)
    rows = 0
    for chunk in loader.iter_split_chunks(data, "train", rows_per_chunk):
        for f, ids in enumerate(chunk.ids):
            counter.add(f, ids)
        rows += chunk.num_rows
    if rows == 0:
        raise ValueError(f"{data.path}: the training split (days {list(data.train_days)}) has no rows to count")
    return counter.result(names, {**provenance(data), "rows": rows})


def _stale(path: Path, data: DataConfig) -> Optional[str]:
    """Why the artifact at ``path`` cannot be used for ``data`` (None when it can)."""
    try:
        recorded = read_header(path)["provenance"]
        load_counts(path)  # damaged arrays (sha256 mismatch): rebuilt
    except (OSError, ValueError) as exc:
        return str(exc)
    recorded = {k: v for k, v in recorded.items() if k != "rows"}
    diffs = differences(recorded, provenance(data))
    return "; ".join(diffs) if diffs else None


def prepare_counts(config: Config) -> str:
    """Build (or rebuild when stale) the id counts of ``config``'s training split; a summary line."""
    path = counts_path(config.data)
    if path.is_file():
        why = _stale(path, config.data)
        if why is None:
            return f"id counts {path} are current"
        logger.info("rebuilding id counts %s: %s", path, why)
    start = time.perf_counter()
    counts = count_ids(config.data)
    counts.save(path)
    exact = sum(counts.exact)
    return (f"id counts {path}: {sum(counts.totals):,} ids of {counts.provenance['rows']:,} training rows, "
            f"{sum(counts.distinct()):,} distinct values kept ({exact}/{counts.num_features} features exact, "
            f"capacity {counts.capacity:,}); {time.perf_counter() - start:.1f} s")


def load_checked_counts(config: Config) -> IdCounts:
    """The id counts of ``config``, checked against its data and options (an error names the rebuild)."""
    path = counts_path(config.data)
    if not path.is_file():
        raise FileNotFoundError(f"id counts {str(path)!r} do not exist; build them with `{BUILD_COMMAND}`")
    counts = load_counts(path)
    recorded = {k: v for k, v in counts.provenance.items() if k != "rows"}
    check_provenance(path, recorded, provenance(config.data), BUILD_COMMAND, what="id counts")
    return counts


__all__ = ["ArtifactMismatch", "count_ids", "counts_path", "load_checked_counts", "needs_counts", "prepare_counts",
           "sizes_from_counts"]
