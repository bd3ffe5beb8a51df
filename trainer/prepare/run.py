"""``compactrec prepare CONFIG``: build what a config needs before training, once (idempotent).

- The id counts of the training split (``trainer.prepare.count_ids``) when the config needs them (hot rows, ``full``
  with a vocabulary, table sizes from the data); rebuilt when they no longer match the data or options.
- The method's own artifact: LMA's minhash index (built from the training data). An index that matches the
  config and the data (``trainer.prepare.provenance`` provenance: data fingerprint and every shaping option) is kept;
  one that differs, or cannot be read, is rebuilt and the differences are logged.

``check_prepared`` is what training and the pre-launch check run for the method's artifact: it raises naming
each differing field and the rebuild command (the id counts are checked where they are loaded,
``trainer.prepare.dataset_info.dataset_info``).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict

from trainer.config import Config

logger = logging.getLogger(__name__)


def _prepare_lma(config: Config) -> str:
    from trainer.prepare.lma_index_build import index_differences, lma_options, run_lma_index

    path = lma_options(config).index_path
    diffs = index_differences(config) if path is not None else None
    if diffs == []:
        return f"LMA index {path} matches the config and the data: kept"
    if diffs:
        logger.warning("LMA index %s does not match the config and the data, rebuilding it: %s", path,
                       "; ".join(diffs))
    return run_lma_index(config)


def _check_lma(config: Config, rebuild_command: str) -> None:
    from trainer.prepare.lma_index_build import check_index

    check_index(config, rebuild_command)


PREPARERS: Dict[str, Callable[[Config], str]] = {"lma": _prepare_lma}
CHECKERS: Dict[str, Callable[[Config, str], None]] = {"lma": _check_lma}


def prepare(config: Config) -> str:
    from trainer.prepare.count_ids import needs_counts, prepare_counts

    lines = [prepare_counts(config)] if needs_counts(config) else []
    step = PREPARERS.get(config.embeddings.kind)
    if step is not None:
        lines.append(step(config))
    return "\n".join(lines) or f"embeddings.kind={config.embeddings.kind}: nothing to prepare"


def check_prepared(config: Config, rebuild_command: str = "compactrec prepare CONFIG [the run's overrides]") -> None:
    """Raise (``ArtifactMismatch``, ``FileNotFoundError``, ``ValueError``) unless the method's artifact that
    ``prepare`` builds for ``config`` exists and matches the config and the data; the message names
    ``rebuild_command``."""
    check = CHECKERS.get(config.embeddings.kind)
    if check is not None:
        check(config, rebuild_command)
