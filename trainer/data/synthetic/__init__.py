"""Seeded synthetic Criteo-like click logs with a hidden ground truth (see docs: data-requirements.md).

Public API::

    from trainer.data.synthetic import SyntheticConfig, generate, preset_config, token_of
    manifest = generate(preset_config("tiny"), "/tmp/syn-tiny")
"""

from .synthetic_config import SyntheticConfig
from .generator import FORMAT_VERSION, auc, generate, logloss
from .keyed_random import token_of
from .field_layout import CAT_FIELDS, DENSE_FIELDS, KAGGLE_CARDINALITIES, build_layout, field_groups
from .presets import PRESETS, get_preset, preset_config

__all__ = [
    "CAT_FIELDS", "DENSE_FIELDS", "FORMAT_VERSION", "KAGGLE_CARDINALITIES", "PRESETS", "SyntheticConfig",
    "auc", "build_layout", "field_groups", "generate", "get_preset", "logloss", "preset_config", "token_of",
]  # fmt: skip
