"""Registry of sparse-arch methods: the trainer picks one by ``embeddings.kind``.

A built-in method's module defines its ``SPEC`` and imports nothing of the registry; :func:`get` imports it on
first use and registers that spec, so importing the registry stays cheap and has no cycles. A method from
outside the package calls :func:`register` (the config's ``embeddings.plugins`` names the modules to import).
"""

from __future__ import annotations

import importlib
from typing import Dict, List

from embeddings.types import SparseArchSpec

_REGISTRY: Dict[str, SparseArchSpec] = {}

# name -> module whose SPEC it is (imported on first lookup)
_BUILTIN_MODULES: Dict[str, str] = {
    "full": "embeddings.full",
    "memrec": "embeddings.memrec",
    "lma": "embeddings.lma",
    "hash": "embeddings.hashing_trick",
    "robe": "embeddings.robe",
    "qr": "embeddings.qr",
}


def register(spec: SparseArchSpec) -> SparseArchSpec:
    """Register ``spec``; registering a different spec under an existing name is an error."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing is not spec:
        raise ValueError(f"sparse arch {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin(name: str) -> None:
    module = _BUILTIN_MODULES.get(name)
    if module is not None and name not in _REGISTRY:
        register(importlib.import_module(module).SPEC)


def get(name: str) -> SparseArchSpec:
    """The spec registered as ``name``; a clear error lists the valid names otherwise."""
    _load_builtin(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown embeddings.kind {name!r}; registered kinds: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> List[str]:
    """All known method names (built-in ones whether or not imported yet)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def load_plugins(modules: List[str]) -> None:
    """Import the modules of methods from outside this package (``embeddings.plugins`` of the config): each
    registers its spec with :func:`register` (and its sharding module its sharder); an import error names it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"embeddings.plugins: cannot import {module!r} ({exc})") from exc
