"""``compactrec prepare CONFIG``: build what a config needs before training, once (idempotent).

- The id counts of the training split (``trainer.prepare.count_ids``) when the config needs them (hot rows, ``full``
  with a vocabulary, table sizes from the data); rebuilt when they no longer match the data or options.
- The method's own artifact, when its spec has :class:`~embeddings.types.ArtifactHooks` (LMA's minhash index):
  one that matches the config and the data (the artifact's provenance: data fingerprint and every shaping option)
  is kept; one that differs, or cannot be read, is rebuilt and the differences are logged.

The trainer never names a method here: it hands the hooks the training split as
:class:`~embeddings.types.TrainingData`. ``check_prepared`` is what training and the pre-launch check run for the
method's artifact: it raises naming each differing field and the rebuild command (the id counts are checked
where they are loaded, ``trainer.prepare.dataset_info.dataset_info``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

from embeddings import registry
from embeddings.types import ArtifactHooks, TrainingData
from trainer.config import Config
from trainer.data import loader
from trainer.prepare.fingerprint import data_fingerprint
from trainer.strict import from_dict

logger = logging.getLogger(__name__)

#: How ``compactrec train`` names the rebuild when it does not know the command line of the run.
REBUILD = "compactrec prepare CONFIG [the run's overrides]"


def training_data(config: Config) -> TrainingData:
    """The training split of ``config`` as the methods' artifact hooks read it."""
    data = config.data
    return TrainingData(
        feature_names=loader.feature_names()[1], embedding_dim=config.model.embedding_dim,
        fingerprint=lambda: data_fingerprint(data, "train"), num_rows=lambda: loader.count_rows(data, "train"),
        batches=lambda: (chunk.to_batch().sparse_features for chunk in loader.iter_split_chunks(data, "train")),
        where=f"the train split of {data.path}")


def method_artifact(config: Config) -> Tuple[Optional[ArtifactHooks], Any]:
    """The configured method's artifact hooks (None when it has none) and its options."""
    spec = registry.get(config.embeddings.kind)
    if spec.artifact is None:
        return None, None
    options: Any = from_dict(spec.options_type, config.embeddings.options, source="config", prefix="embeddings.options")
    return spec.artifact, options


def artifact_path(config: Config) -> Optional[str]:
    """The configured method's artifact file (recorded in checkpoints), None when it has none."""
    hooks, options = method_artifact(config)
    return None if hooks is None else hooks.path(options)


def build_artifact(config: Config, out: Optional[str] = None) -> str:
    """Build the method's artifact into ``out`` (default: the configured path); returns a summary."""
    hooks, options = method_artifact(config)
    if hooks is None:
        raise ValueError(f"embeddings.kind is {config.embeddings.kind!r}, which needs no artifact built from the data "
                         "(`compactrec build-artifact` builds a method's artifact, e.g. an lma config's index)")
    path = out or hooks.path(options)
    if path is None:
        raise ValueError(f"no output path for the {hooks.name}: pass --out PATH or set {hooks.path_option}")
    return hooks.build(options, training_data(config), path)


def _prepare_artifact(config: Config, hooks: ArtifactHooks, options: Any) -> str:
    path = hooks.path(options)
    data = training_data(config)
    diffs = hooks.differences(options, data) if path is not None else None
    if diffs == []:
        return f"{hooks.name} {path} matches the config and the data: kept"
    if diffs:
        logger.warning("%s %s does not match the config and the data, rebuilding it: %s", hooks.name, path,
                       "; ".join(diffs))
    return build_artifact(config)


def prepare(config: Config) -> str:
    from trainer.prepare.count_ids import needs_counts, prepare_counts

    lines = [prepare_counts(config)] if needs_counts(config) else []
    hooks, options = method_artifact(config)
    if hooks is not None:
        lines.append(_prepare_artifact(config, hooks, options))
    return "\n".join(lines) or f"embeddings.kind={config.embeddings.kind}: nothing to prepare"


def check_prepared(config: Config, rebuild_command: str = REBUILD) -> None:
    """Raise (``ArtifactMismatch``, ``FileNotFoundError``, ``ValueError``) unless the method's artifact that
    ``prepare`` builds for ``config`` exists and matches the config and the data; the message names
    ``rebuild_command``."""
    hooks, options = method_artifact(config)
    if hooks is not None:
        hooks.check(options, training_data(config), rebuild_command)
