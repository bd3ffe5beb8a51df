"""``compactrec prepare CONFIG``: build what a config needs before training, once (idempotent).

- The id counts of the training split (``trainer.id_counts``) when the config needs them (hot rows, ``full``
  with a vocabulary, table sizes from the data); rebuilt when they no longer match the data or options.
- The method's own artifact: LMA's minhash index (built from the training data). A present index is kept;
  training itself checks that it matches the config and names the rebuild command when it does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from trainer.config import Config


def _prepare_lma(config: Config) -> str:
    from trainer.lma_index import lma_options, run_lma_index

    path = lma_options(config).index_path
    if path is not None and Path(path).is_file():
        return f"LMA index {path} exists (training checks it against the config)"
    return run_lma_index(config)


PREPARERS: Dict[str, Callable[[Config], str]] = {"lma": _prepare_lma}


def prepare(config: Config) -> str:
    from trainer.id_counts import needs_counts, prepare_counts

    lines = [prepare_counts(config)] if needs_counts(config) else []
    step = PREPARERS.get(config.embeddings.kind)
    if step is not None:
        lines.append(step(config))
    return "\n".join(lines) or f"embeddings.kind={config.embeddings.kind}: nothing to prepare"
