"""Checks shared by every method: options at construction (errors name ``embeddings.options.<field>``) and
the KJTs of raw ids given to forward."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def where(name: str) -> str:
    return f"embeddings.options.{name}"


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where(name)} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where(name)} must be {bound}, got {value}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{where(name)} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_layout_args(feature_names: Sequence[str], embedding_dim: Any, table_prefix: str) -> list[str]:
    """Feature names non-empty, unique and dot-free; a dot-free table prefix; a positive int dim."""
    names = list(feature_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"feature names must be non-empty and unique, got {names}")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"feature name {name!r} must be a non-empty string without '.'")
    if not table_prefix or "." in table_prefix:
        raise ValueError(f"table_prefix {table_prefix!r} must be a non-empty string without '.'")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    return names


def select_features(features: KeyedJaggedTensor, feature_names: List[str], method: str,
                    weights_note: str = "") -> KeyedJaggedTensor:
    """``features`` restricted to and ordered as ``feature_names`` (checks shape only): unweighted, no VBE."""
    if features.weights_or_none() is not None:
        raise ValueError(f"{method} takes unweighted KJTs of raw ids{weights_note}")
    if features.variable_stride_per_key():
        raise ValueError(f"{method} does not support variable batch size per feature (VBE) KJTs")
    keys = features.keys()
    if keys == feature_names:
        return features
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(f"input KJT lacks features {missing} (has {keys})")
    return features.permute([keys.index(f) for f in feature_names])
