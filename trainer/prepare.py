"""``compactrec prepare CONFIG``: build what a method needs before training, once (idempotent).

Today only LMA has such a step (its minhash index, built from the training data). A present index is kept;
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
    step = PREPARERS.get(config.embeddings.kind)
    return step(config) if step is not None else f"embeddings.kind={config.embeddings.kind}: nothing to prepare"
