"""Extensions of TorchRec's placement cost model where it does not know our modules or our runtime.

Communication on CPU. TorchRec's default bandwidths describe GPU hosts: all-to-all, reduce-scatter and all-gather
inside a host at 600 GiB/s (NVLink), an all-reduce at the NIC's 25 GiB/s times the local world size. Between CPU
ranks every collective goes through gloo, measured at 0.6-2.4 GB/s for 2 ranks on this machine
(``benchmarks/gloo_bandwidth.py``), all-reduce and all-to-all alike. With the GPU figures a row-wise table's
all-to-alls look nearly free and a replicated table's all-reduce 24x dearer than they are on CPU.
:class:`HostCommsBandwidths` gives every collective one bandwidth inside a host and one across hosts
(``sharding.cpu_comms_gbps``), used for CPU topologies.

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
import math
from typing import Any, Dict, List, Optional

import torch
from torchrec.distributed.planner.constants import BIGINT_DTYPE
from torchrec.distributed.planner.types import (
    CollectiveType,
    GeneralizedCommsBandwidth,
    ParameterConstraints,
    ShardEstimator,
    ShardingOption,
    Topology,
)
from torchrec.distributed.types import ShardingType

from embeddings.remap import RemappedEmbeddingBagCollection

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


class HostCommsBandwidths(GeneralizedCommsBandwidth):
    """Every collective at ``intra_gbps`` inside a host and ``inter_gbps`` across hosts (GB/s), the all-reduce
    included (TorchRec's ``BasicCommsBandwidths`` sends it through one NIC per GPU); free on a single rank."""

    def __init__(self, intra_gbps: float, inter_gbps: float) -> None:
        if intra_gbps <= 0 or inter_gbps <= 0:
            raise ValueError(f"bandwidths must be positive, got intra {intra_gbps} and inter {inter_gbps} GB/s")
        self._intra = intra_gbps * 1e6  # TorchRec's unit: bytes per ms
        self._inter = inter_gbps * 1e6

    @property
    def intra_host_bw(self) -> float:
        return self._intra

    @property
    def inter_host_bw(self) -> float:
        return self._inter

    def get_bw(self, local_world_size: int, world_size: int, collective_type: CollectiveType) -> float:
        if world_size <= 1:
            return math.inf  # one rank: nothing is sent (TorchRec would price its "collectives" all the same)
        return self._intra if world_size <= local_world_size else self._inter

    def __str__(self) -> str:
        return f"HostCommsBandwidths: intra_host_bw={self._intra}, inter_host_bw={self._inter} (bytes/ms)"


class FusedReplicaEstimator(ShardEstimator):
    """Prices the data-parallel candidates that run as replicated tables on the fused operator
    (:mod:`sharding.fused`: CPU, the module's ``kernel: auto``, the C++ library built). TorchRec prices a
    data-parallel table as a dense kernel whose whole-table gradient is all-reduced every step (21.6 MB at the
    Kaggle 100x preset); the fused replicas instead all-gather each rank's output gradients (``B x features x dim``
    float32), chunk addresses (int64 per chunk of every id) and bag lengths, and send nothing forward. This
    estimator replaces the candidate's communication by that all-gather's bytes over the topology's all-gather
    bandwidth; the compute stays TorchRec's estimate (a lookup and its gradient per id)."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None) -> None:
        self._topology = topology
        self._cpu = topology.compute_device == "cpu"

    def allgather_bytes(self, option: ShardingOption) -> Optional[float]:
        """Bytes one rank contributes to the backward all-gather, or None when ``option`` is not a fused replica."""
        module = option.module[1]
        if option.sharding_type != ShardingType.DATA_PARALLEL.value or not self._cpu or \
                not isinstance(module, RemappedEmbeddingBagCollection):
            return None
        plan = module._fused_plan(torch.device("cpu"))
        if plan is None:
            return None
        layout, batch = module.layout, option.batch_size
        features = len(layout.feature_names)
        ids = batch * sum(module.pooling_factors)  # raw ids per rank and step
        total = float(batch * features * layout.embedding_dim * 4 + ids * plan[0].num_chunks * BIGINT_DTYPE
                      + batch * features * BIGINT_DTYPE)
        # one all-gather serves all of the module's tables: each table's candidate carries its share (by the
        # inner features it serves: the hashing trick has one table per feature, ROBE-Z / LMA one for all)
        inner = sum(len(c.feature_names) for c in layout.inner_configs())
        return total * len(option.input_lengths) / inner

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: Any = None) -> None:
        world, local = self._topology.world_size, self._topology.local_world_size
        bandwidth = self._topology.comms_bandwidths.get_bw(local, world, CollectiveType.ALL_GATHER)
        for option in sharding_options:
            sent = self.allgather_bytes(option)
            if sent is None:
                continue
            comms = (world - 1) * sent / bandwidth if math.isfinite(bandwidth) else 0.0
            for shard in option.shards:
                if shard.perf is not None:
                    shard.perf = dataclasses.replace(shard.perf, fwd_comms=0.0, bwd_comms=comms)
