"""Extensions of TorchRec's placement cost model where it does not know our modules or our runtime.

TorchRec's ``EmbeddingPerfEstimator`` prices the input all-to-all of every sharded table (``Perf.input_dist_comms``)
but leaves it out of ``Perf.total``, the figure the planner compares: on CUDA, ``TrainPipelineSparseDist`` overlaps
the next batch's input dist with this batch's compute. Two things change that for us:

- On CPU the pipeline runs its stages inline (there are no streams to overlap on), so the input all-to-all adds to
  every step of a row-wise or table-wise table, and not at all to a data-parallel (replicated) one.
- MEM-REC's weighted token lookups send a float32 weight with every lookup id (its weight row), which TorchRec's
  input-dist estimate does not count (it prices ids only).

:class:`InlineInputDistEstimator` runs after TorchRec's estimator and, on a CPU topology, adds the input dist of
each non-data-parallel candidate (ids, plus 4 bytes per lookup for weighted tables) to its forward communication.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from torchrec.distributed.planner.constants import BIGINT_DTYPE
from torchrec.distributed.planner.types import ParameterConstraints, ShardEstimator, ShardingOption, Topology
from torchrec.distributed.types import ShardingType

WEIGHT_BYTES = 4  # float32 per-lookup weight in a weighted KJT


class InlineInputDistEstimator(ShardEstimator):
    """Adds the input all-to-all to the compared cost of non-data-parallel candidates on CPU topologies."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None) -> None:
        self._cpu = topology.compute_device == "cpu"
        self._constraints = constraints or {}

    def input_dist_factor(self, table: str) -> float:
        """Bytes sent per lookup relative to TorchRec's estimate (ids only): 1.5 for weighted tables."""
        constraint = self._constraints.get(table)
        weighted = bool(constraint is not None and constraint.is_weighted)
        return (BIGINT_DTYPE + WEIGHT_BYTES) / BIGINT_DTYPE if weighted else 1.0

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: Any = None) -> None:
        if not self._cpu:
            return
        for option in sharding_options:
            if option.sharding_type == ShardingType.DATA_PARALLEL.value:
                continue
            factor = self.input_dist_factor(option.name)
            for shard in option.shards:
                if shard.perf is None:
                    continue
                extra = shard.perf.input_dist_comms * factor
                shard.perf = dataclasses.replace(shard.perf, fwd_comms=shard.perf.fwd_comms + extra,
                                                 input_dist_comms=extra)
