"""Replicated compressed tables on the fused operator: the whole embedding stage is one fused call per rank.

Where the plan places every table of an id-remapping module (``hash``, ``robe``, ``lma``, ...) ``data_parallel``
and the module runs the fused operator (``embeddings.options.kernel: auto``, CPU tensors, the C++ library built,
an in-backward optimizer that the operator has: SGD, Adagrad, row-wise Adagrad),
:class:`RemappedEmbeddingBagCollectionSharder` builds :class:`ReplicatedFusedEmbeddingBagCollection` instead of
TorchRec's data-parallel EBC (a dense kernel whose full-table gradient DDP all-reduces and a dense optimizer then
steps over every row):

- ``input_dist``: nothing to distribute; each rank looks up its own batch.
- ``compute``: ``compactrec::chunk_bag_forward`` on the rank's raw ids (hot rows, hashes, addresses, gather and
  pooling in one pass), as the unsharded module runs it.
- backward: ``compactrec::chunk_bag_backward`` after one all-gather of every rank's addresses, bag lengths and
  output gradients (``embeddings.ops.chunk_bag.replicate``): every replica applies the same fused update for the
  union of the ranks' lookups, scaled by 1 / world size (the gradient of the mean of the ranks' losses, as DDP
  averages), so the replicas stay bitwise equal. What is sent per step is the ranks' output gradients and
  addresses, not the tables' gradient.

Parameter and buffer names equal the unsharded module's (``ebc.embedding_bags.<table>.weight``), so state dicts
interchange with the unsharded module and with the row-wise sharded one (DCP re-splits). The tables are excluded
from DDP (``sharded_parameter_names``) and their optimizer state is this module's ``fused_optimizer``
(``<table>.momentum1``, fbgemm's key), which DMP puts into its ``CombinedOptimizer``: checkpointed, resumed and
re-split like the TBE's. The replicas start from rank 0's tables (broadcast at construction).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    LazyNoWait,
    NoWait,
    NullShardedModuleContext,
    ParameterSharding,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.ops import chunk_bag
from embeddings.remap import RemappedEmbeddingBagCollection

logger = logging.getLogger(__name__)

INNER_EBC = "ebc"


def replicated_fused_reason(module: RemappedEmbeddingBagCollection, params: Dict[str, ParameterSharding],
                            device: torch.device) -> Optional[str]:
    """None when ``module`` with plan ``params`` runs as :class:`ReplicatedFusedEmbeddingBagCollection`, else why
    not (TorchRec's path then runs)."""
    names = [c.name for c in module.layout.inner_configs()]
    types = {params[n].sharding_type for n in names if n in params}
    if types != {ShardingType.DATA_PARALLEL.value} or any(n not in params for n in names):
        return f"its tables are planned {sorted(types)}, not all data_parallel"
    if not module.uses_fused_kernel(device):
        return (f"the fused operator does not run it on {device.type} (kernel: tbe, a device other than CPU, "
                "or the C++ library not built)")
    plan = module._fused_plan(device)
    assert plan is not None
    weights = module.fused_weights(plan[1])
    if chunk_bag.fused_update_of(weights) is None:  # type: ignore[arg-type]
        return "its tables carry no in-backward optimizer"
    return None


def _materialize(module: RemappedEmbeddingBagCollection, device: torch.device) -> None:
    """``module`` on ``device``: a module built on the meta device (as the trainer builds it, for DMP to place)
    gets its tables allocated and initialised as TorchRec initialises an EBC's (``reset_parameters``: each
    config's ``init_fn``, else uniform in +-sqrt(1 / rows)), its layout buffers rebuilt from the layout and its
    in-backward optimizers re-attached to the new parameters with fresh state (rank 0's tables and state are then
    broadcast). A module already holding data is moved."""
    if not any(p.is_meta for p in module.parameters()):
        module.to(device)
        return
    attached = {}
    for name, param in module.ebc.named_parameters():
        if hasattr(param, "_optimizer_classes"):
            attached[name] = (param._optimizer_classes[0], dict(param._optimizer_kwargs[0]))  # type: ignore[attr-defined]
    module.ebc.to_empty(device=device)
    with torch.no_grad():  # EmbeddingBagCollection.reset_parameters skips a module built on meta
        for config in module.ebc.embedding_bag_configs():
            weight = module.ebc.embedding_bags[config.name].weight
            if config.init_fn is not None:
                config.init_fn(weight)
            else:
                bound = (1.0 / config.num_embeddings) ** 0.5
                torch.nn.init.uniform_(weight, -bound, bound)
    for name, tensor in module.layout.all_buffers(device).items():
        setattr(module, name, tensor)
    params = dict(module.ebc.named_parameters())
    for name, (cls, kwargs) in attached.items():
        param = params[name]
        for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
            if hasattr(param, attr):
                delattr(param, attr)
        apply_optimizer_in_backward(cls, [param], kwargs)


class FusedTableOptimizer(KeyedOptimizer):
    """The fused update's state as a :class:`KeyedOptimizer` (what DMP's ``CombinedOptimizer`` checkpoints): the
    update itself runs in the backward, so ``step`` and ``zero_grad`` do nothing. Keys follow fbgemm's fused
    optimizer (``<table>.momentum1``); the tensors are the ones the operator updates, so a load is in place."""

    def __init__(self, tables: Dict[str, Tuple[str, nn.Parameter]]) -> None:
        params: Dict[str, Any] = {}
        state: Dict[Any, Any] = {}
        groups: List[Dict[str, Any]] = []
        for key, (table, weight) in tables.items():
            optimizer = weight._in_backward_optimizers[0]  # type: ignore[attr-defined]
            params[key] = weight
            own = optimizer.state.get(weight, {})
            state[weight] = {f"{table}.momentum1": own["sum"]} if "sum" in own else {}
            groups.append(optimizer.param_groups[0])  # the same dict: an LR set here reaches the kernel
        super().__init__(params, state, groups)

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass

    def step(self, closure: Any = None) -> None:
        pass


class ReplicatedFusedEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, NullShardedModuleContext],
    FusedOptimizerModule,
):
    """Every table of ``module`` replicated on every rank of ``env``, looked up and updated by the fused operator
    (see the module docstring)."""

    def __init__(self, module: RemappedEmbeddingBagCollection, env: ShardingEnv, device: torch.device) -> None:
        super().__init__()
        if env.process_group is None:
            raise ValueError("replicated fused tables need a process-group sharding environment")
        _materialize(module, device)
        plan = module._fused_plan(device)
        if plan is None:
            raise ValueError(f"{module.layout.method}: the fused operator does not run this module on {device}")
        self._unsharded = [module]  # a list: not a submodule (its ``ebc`` is registered here, with the same names)
        self._unsharded_type: Type[nn.Module] = type(module)
        self._plan = plan
        self._env = env
        self.ebc = module.ebc
        for name, tensor in module.layout_buffers().items():
            self.register_buffer(name, tensor, persistent=False)
        weights = module.fused_weights(plan[1])
        group = env.process_group
        with torch.no_grad():
            source = dist.get_global_rank(group, 0)
            for w in weights:
                dist.broadcast(w.data, src=source, group=group)
            update = chunk_bag.fused_update_of(weights)  # type: ignore[arg-type]
            if update is None:
                raise ValueError(f"{module.layout.method}: replicated fused tables need an in-backward optimizer "
                                 "(trainer.train.optim.apply_sparse_optimizer)")
            for state in update.states:
                dist.broadcast(state, src=source, group=group)
        chunk_bag.replicate(weights, group)  # type: ignore[arg-type]
        keys = {f"{INNER_EBC}.embedding_bags.{name}.weight": (name, w) for name, w in zip(plan[1], weights)}
        self._optimizer = FusedTableOptimizer(keys)  # type: ignore[arg-type]
        logger.info("%s: %d tables replicated over %d ranks on the fused operator", module.layout.method,
                    len(weights), dist.get_world_size(group))

    # ---- the pipelined steps ------------------------------------------------------------------
    def input_dist(self, ctx: NullShardedModuleContext,
                   features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        # the pipeline fuses its modules' input-dist splits: it expects this type (a KJT all-to-all's awaitables)
        return KJTListSplitsAwaitable([NoWait(NoWait(features))], ctx)

    def compute(self, ctx: NullShardedModuleContext, dist_input: KJTList) -> List[torch.Tensor]:
        return [self._unsharded[0]._fused_forward(dist_input[0], self._plan).values()]

    def output_dist(self, ctx: NullShardedModuleContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        layout = self._unsharded[0].layout
        return LazyNoWait(KeyedTensor(keys=layout.feature_names,
                                      length_per_key=[layout.embedding_dim] * len(layout.feature_names),
                                      values=output[0]))

    def compute_and_output_dist(self, ctx: NullShardedModuleContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    # ---- ShardedModule plumbing ---------------------------------------------------------------
    def create_context(self) -> NullShardedModuleContext:
        return NullShardedModuleContext()

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, _ in self.ebc.named_parameters(prefix=INNER_EBC):
            yield append_prefix(prefix, name)

    @property
    def unsharded_module_type(self) -> Type[nn.Module]:
        return self._unsharded_type
