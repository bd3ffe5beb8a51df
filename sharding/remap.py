"""Sharded id-remapping modules (``hash``, ``robe``, ``lma``, ``qr``): TorchRec's sharded EBC behind an id map.

Follows TorchRec's own wrappers around an inner EBC (``fp_embeddingbag.py``, ``mc_embeddingbag.py``) and
``sharding.memrec``:

- ``input_dist``: map the raw ids (``layout.expand``: hashing, dictionary lookups, chunk expansion) *then*
  call the inner EBC's input dist, so row-wise bucketing routes on the mapped rows and
  ``TrainPipelineSparseDist`` pipelines the mapping with the input all-to-all.
- ``compute``: the inner EBC's fbgemm TBE lookups, fused optimizer applied in backward.
- ``output_dist``: the inner EBC's output dist, then ``layout.finish`` (chunk concatenation, QR's product
  and pooling) on the data-parallel side.

These methods have no dense parameters; the layout's buffers (hash salts, LMA's dictionary) are replicated
on every rank and counted by the method's memory report. Nothing here is device specific.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardingEnv, ShardingType
from torchrec.distributed.utils import append_prefix
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.remap import Aux, RemappedEmbeddingBagCollection
from sharding.ebc import InnerEBCSharder
from sharding.fused import ReplicatedFusedEmbeddingBagCollection, replicated_fused_reason

logger = logging.getLogger(__name__)

INNER_EBC = "ebc"


@dataclass
class RemappedContext(EmbeddingBagCollectionContext):
    """The inner EBC's context plus what ``finish`` needs from ``expand``."""

    aux: Aux = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for tensor in (self.aux or {}).values():
            tensor.record_stream(stream)


class ShardedRemappedEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, RemappedContext]
):
    """Sharded form of any :class:`RemappedEmbeddingBagCollection` (the layout carries the method).

    Parameter names equal the unsharded module's (``ebc.embedding_bags.<table>.weight``).
    """

    def __init__(
        self,
        module: RemappedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        self._layout = module.layout
        self._layout.check_shardable()
        self._unsharded_type: Type[nn.Module] = type(module)
        self._env = env
        names = [c.name for c in self._layout.inner_configs()]
        missing = [n for n in names if n not in table_name_to_parameter_sharding]
        if missing:
            raise ValueError(f"sharding plan lacks {self._layout.method} tables {missing}; "
                             f"planned: {sorted(table_name_to_parameter_sharding)}")
        self.ebc: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.ebc,
            {n: table_name_to_parameter_sharding[n] for n in names},
            env=env,
            device=device,
            module_fqn=append_prefix(module_fqn, INNER_EBC) if module_fqn else None,
        )
        self._buffer_names: List[str] = []
        for name, tensor in self._layout.all_buffers(device).items():
            self.register_buffer(name, tensor, persistent=False)
            self._buffer_names.append(name)

    def _buffers_by_name(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._buffer_names}

    # ---- the pipelined steps ------------------------------------------------------------------
    def input_dist(self, ctx: RemappedContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        with torch.no_grad():
            kjt, ctx.aux = self._layout.expand(features, self._buffers_by_name(), self._uniform_stride(features))
        return self.ebc.input_dist(ctx, kjt)

    def _uniform_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        """The maximum over ranks of a data-dependent inner stride (one scalar all-reduce), else None."""
        local = self._layout.local_stride(features)
        if local is None or self._env.world_size == 1:
            return local
        stride = torch.tensor([local], dtype=torch.int64, device=features.values().device)
        dist.all_reduce(stride, op=dist.ReduceOp.MAX, group=self._env.process_group)
        return int(stride.item())

    def compute(self, ctx: RemappedContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self.ebc.compute(ctx, dist_input)

    def output_dist(self, ctx: RemappedContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._add_finish(ctx, self.ebc.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: RemappedContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self._add_finish(ctx, self.ebc.compute_and_output_dist(ctx, input))

    def _add_finish(self, ctx: RemappedContext, awaitable: LazyAwaitable[KeyedTensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable.callbacks.append(partial(self._layout.finish, aux=ctx.aux))
        return awaitable

    # ---- ShardedModule plumbing ---------------------------------------------------------------
    def create_context(self) -> RemappedContext:
        return RemappedContext()

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, _ in self.ebc.named_parameters(prefix=INNER_EBC):
            yield append_prefix(prefix, name)

    @property
    def unsharded_module_type(self) -> Type[nn.Module]:
        return self._unsharded_type


class RemappedEmbeddingBagCollectionSharder(InnerEBCSharder[RemappedEmbeddingBagCollection]):
    """Sharder of one id-remapping module type (DMP looks sharders up by exact module type: each method
    subclasses this with its ``module_type``). The inner tables go through ``ebc_sharder`` (default
    :class:`RowWiseCapableEBCSharder`). Pass the same instance to the planner and to DMP."""

    def shardable_parameters(self, module: RemappedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return dict(self._ebc_sharder.shardable_parameters(module.ebc))

    def shard(self, module: RemappedEmbeddingBagCollection, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        """:class:`sharding.fused.ReplicatedFusedEmbeddingBagCollection` where the plan replicates every table
        and the fused operator runs the module; else TorchRec's sharded inner EBC behind the id map."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reason = replicated_fused_reason(module, params, device)
        if reason is None and env.process_group is not None:
            return ReplicatedFusedEmbeddingBagCollection(module, env, device)
        if all(p.sharding_type == ShardingType.DATA_PARALLEL.value for p in params.values()):
            logger.info("%s: replicated tables on TorchRec's data-parallel EBC: %s", module.layout.method, reason)
        return super().shard(module, params, env, device, module_fqn)

    @property
    def module_type(self) -> Type[RemappedEmbeddingBagCollection]:
        raise NotImplementedError("subclass per method: DMP matches sharders by exact module type")

    @property
    def sharded_module_type(self) -> Type[ShardedRemappedEmbeddingBagCollection]:
        return ShardedRemappedEmbeddingBagCollection
