"""The sharders of every built-in method, registered by module type; ``sharders_for(module)`` is what the trainer,
the planner and DMP are given (see :mod:`sharding.registry`)."""

from __future__ import annotations

import sharding.ebc  # noqa: F401 (registers the plain EmbeddingBagCollection: full tables with ids: mod)
import sharding.full  # noqa: F401
import sharding.hashing_trick  # noqa: F401
import sharding.lma  # noqa: F401
import sharding.memrec  # noqa: F401
import sharding.qr  # noqa: F401
import sharding.robe  # noqa: F401
from sharding.registry import register_sharder, registered_types, sharders_for

__all__ = ["register_sharder", "registered_types", "sharders_for"]
