"""Sharders by module type: how the trainer, the planner and DMP find the sharder of an embedding module.

The unsharded modules of ``embeddings/`` never name their sharders (``embeddings/`` imports nothing of
``sharding/``); each ``sharding/<method>.py`` registers its sharder for the module type it shards, as TorchRec
finds a sharder by ``sharder.module_type``. A method added from outside the package does the same from its own
sharding module (imported through ``embeddings.plugins`` of the config). This module is a leaf;
:mod:`sharding.sharders` imports every built-in sharding module and is where callers get their sharders.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type

from torch import nn
from torchrec.distributed.types import ModuleSharder

SharderFactory = Callable[[], ModuleSharder[nn.Module]]

_SHARDERS: Dict[type, SharderFactory] = {}


def register_sharder(module_type: type, factory: SharderFactory) -> None:
    """Shard modules of exactly ``module_type`` with ``factory()``; a second, different factory is an error."""
    existing = _SHARDERS.get(module_type)
    if existing is not None and existing is not factory:
        raise ValueError(f"a sharder for {module_type.__qualname__} is already registered ({existing!r})")
    _SHARDERS[module_type] = factory


def registered_types() -> List[Type[nn.Module]]:
    return list(_SHARDERS)


def sharders_for(module: nn.Module) -> List[ModuleSharder[nn.Module]]:
    """One sharder per registered module type found in ``module`` (itself or a submodule), outermost first; a
    registered module's own children are not searched (its sharder shards them). Pass the same list to the
    planner and to ``DistributedModelParallel``."""
    found: List[type] = []

    def visit(m: nn.Module) -> None:
        if type(m) in _SHARDERS:
            if type(m) not in found:
                found.append(type(m))
            return
        for child in m.children():
            visit(child)

    visit(module)
    if not found:
        raise ValueError(f"no sharder registered for any module inside {type(module).__name__}; a method's "
                         "sharding module registers one with sharding.registry.register_sharder(ModuleType, "
                         "SharderClass)")
    return [_SHARDERS[t]() for t in found]
