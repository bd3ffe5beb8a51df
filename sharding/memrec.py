"""Sharded MEM-REC: TorchRec's sharded EBC for the token tables, the weight table replicated.

Follows TorchRec's own wrappers around an inner EBC (``fp_embeddingbag.py``, ``mc_embeddingbag.py``):

- ``input_dist``: hash the raw ids (``layout.expand``) *then* call the inner EBC's input dist, so
  row-wise bucketing routes on token rows and ``TrainPipelineSparseDist`` pipelines the hashing with
  the input all-to-all. Weight-row indices ride along as float32 KJT weights.
- ``compute``: turn the weight-row indices into learned weights (``layout.weigh``) on the
  model-parallel side, then the inner EBC's fbgemm TBE lookups (fused optimizer).
  The weight table is tied into each lookup output (:class:`_KeepInGraph`, a no-copy identity whose backward
  gives the table a zero gradient) so that every rank's DDP reducer sees it, also a rank that holds no token
  shard, and sees its gradient complete at the same point of the backward on every rank (after the output
  all-to-all), whatever the placement.
- ``output_dist``: the inner EBC's output dist, then ``layout.finish`` (MEAN division, per-sample alpha).

The weight table is a dense replicated parameter, like an MLP weight or the position weights of TorchRec's
``FeatureProcessedEmbeddingBagCollection``: a plain parameter of this module, not in
``sharded_parameter_names()`` (DMP's DDP wrapper all-reduces its gradient) and not in the sharder's
``shardable_parameters()``. The planner therefore only places the token tables, and any placement it picks
for them (row_wise, table_wise, data_parallel, ...) is valid: a stock ``EmbeddingShardingPlanner`` needs no
constraints. Nothing here is device specific (CPU/gloo and CUDA/NCCL run the same code).

Factored training path (``embeddings.memrec.factored``): when every bag's lookups share one weight row (one-hot
data with kw = 1) on every rank, and the lookups run on CPU, ``compute`` weights the lookups with the detached
alphas and turns off fbgemm's per-lookup weight gradient (``sharding.tbe_weight_grad``), and ``output_dist``
gives the weight table its gradient from the pooled outputs. Every rank takes the same path (one scalar
all-reduce when world size > 1). Other batches, eval and CUDA keep the weighted lookup with learned weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import ContextManager, Dict, Iterator, List, Optional, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardingEnv
from torchrec.distributed.utils import append_prefix
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.memrec.factored import (
    FactoredBags,
    bag_alpha,
    factor_bags,
    is_factorable,
    key_order,
    lookup_weight_table,
    weight_grad_from_outputs,
)
from embeddings.memrec.layout import MemRecAux, init_weight_table, with_values
from embeddings.memrec.module import MemRecEmbeddingBagCollection, MemRecModuleBase
from embeddings.memrec.per_sample import MemRecPerSampleEmbeddingBag
from sharding.ebc import InnerEBCSharder
from sharding.registry import register_sharder
from sharding.tbe_weight_grad import WeightGradSwitch, sharded_ebc_lookups

TOKEN_EBC = "token_ebc"


class _KeepInGraph(torch.autograd.Function):
    """``values`` unchanged (no copy), with ``weight`` as an input of the graph; backward: ``weight`` gets zeros.

    Same values and gradients as ``values + 0 * weight.sum()`` (bar a NaN/inf weight, which that sum would
    spread into every output), without its pass over the whole ``[B, F * dim]`` output (an add in forward,
    a full reduction of the output gradient in backward: on CPU as costly as the token lookup itself)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight_shape = weight.shape  # type: ignore[attr-defined]
        return values.view_as(values)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        return grad, grad.new_zeros(ctx.weight_shape)  # type: ignore[attr-defined]


@dataclass
class MemRecContext(EmbeddingBagCollectionContext):
    """The inner EBC's context plus what ``finish`` needs from ``expand``."""

    aux: Optional[MemRecAux] = None
    bags: Optional[FactoredBags] = None  # set when this batch takes the factored path

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.aux is not None:
            self.aux.record_stream(stream)
        if self.bags is not None:
            self.bags.record_stream(stream)


class ShardedMemRecEmbeddingBag(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, MemRecContext]
):
    """Sharded form of either MEM-REC granularity (the layout carries the difference).

    Parameter names equal the unsharded module's (``token_ebc.embedding_bags.<table>.weight``,
    ``weight_table``), so state dicts line up. ``factored_weights = False`` (on the instance, the same on every
    rank) keeps every batch on the weighted lookup, e.g. to measure one path against the other.
    """

    factored_weights: bool = True

    def __init__(
        self,
        module: MemRecModuleBase,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        self._layout = module.layout
        self._unsharded_type: Type[nn.Module] = type(module)
        self._device = device
        self._env = env
        token_names = [c.name for c in module.embedding_bag_configs()]
        _check_plan(table_name_to_parameter_sharding, token_names, self._layout.weight_table_name)
        token_plan = {name: table_name_to_parameter_sharding[name] for name in token_names}
        self.token_ebc: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.token_ebc,
            token_plan,
            env=env,
            device=device,
            module_fqn=append_prefix(module_fqn, TOKEN_EBC) if module_fqn else None,
        )
        weight = module.weight_table
        if weight.is_meta:
            table = torch.empty(weight.shape, dtype=weight.dtype, device=device)
            init_weight_table(table, self._layout.options)
        else:
            table = weight.detach().to(device=device, copy=True)
        # DDP broadcasts rank 0's values at wrapping, so every rank starts from the same table.
        self.weight_table = nn.Parameter(table, requires_grad=weight.requires_grad)
        token_salts, weight_salts = self._layout.salts()
        self.register_buffer("token_salts", token_salts.to(device), persistent=False)
        self.register_buffer("weight_salts", weight_salts.to(device), persistent=False)
        self._hot_names: List[str] = []
        for name, tensor in self._layout.hot.buffers(device).items():
            self.register_buffer(name, tensor, persistent=False)
            self._hot_names.append(name)
        self._feature_index = {f: i for i, f in enumerate(self._layout.feature_names)}
        self._key_orders: Dict[object, torch.Tensor] = {}
        self.factored_batches = 0  # batches that took the factored path (a count for logs and tests)
        self._weight_grad_switch = WeightGradSwitch(sharded_ebc_lookups(self.token_ebc))

    # ---- the pipelined steps ------------------------------------------------------------------
    def input_dist(self, ctx: MemRecContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        factored_candidate = self._factored_candidate()
        with torch.no_grad():
            hot = {name: getattr(self, name) for name in self._hot_names}
            kjt, ctx.aux = self._layout.expand(features, self.token_salts, self.weight_salts, hot)
            if factored_candidate and self._all_ranks_factorable(kjt):
                offsets = None if self._layout.options.shared_tables else \
                    self._layout.weight_row_offsets(kjt.keys(), kjt.values().device)
                ctx.bags = factor_bags(kjt, offsets)
                self.factored_batches += 1
        return self.token_ebc.input_dist(ctx, kjt)

    def _factored_candidate(self) -> bool:
        """Training a weighted layout on CPU (the same answer on every rank)."""
        return (self.factored_weights and self._layout.is_weighted and self._device.type == "cpu" and self.training
                and torch.is_grad_enabled() and self.weight_table.requires_grad)

    def _all_ranks_factorable(self, kjt: KeyedJaggedTensor) -> bool:
        local = is_factorable(kjt)
        if self._env.world_size == 1:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int64, device=kjt.values().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._env.process_group)
        return bool(flag.item())

    def _weigh(self, ctx: MemRecContext, dist_input: KJTList) -> KJTList:
        # factored: the lookups carry the alphas detached; the weight gradient comes from the outputs
        table = self.weight_table if ctx.bags is None else lookup_weight_table(self.weight_table)
        return KJTList([self._layout.weigh(kjt, table) for kjt in dist_input])

    def _lookup_scope(self, ctx: MemRecContext) -> ContextManager[None]:
        """Where the TBE lookups run: factored batches without fbgemm's per-lookup weight gradient."""
        return self._weight_grad_switch.without_weight_grad() if ctx.bags is not None else contextlib.nullcontext()

    def compute(self, ctx: MemRecContext, dist_input: KJTList) -> List[torch.Tensor]:
        weighted = self._weigh(ctx, dist_input)
        with self._lookup_scope(ctx):
            outputs = self.token_ebc.compute(ctx, weighted)
        # ties the replicated weight table into every rank's graph *before* the output all-to-all, also on a
        # rank that holds no token shard (its lookup output is empty): the table's gradient is then complete,
        # and DDP all-reduces it, only after that all-to-all's backward on every rank. Tied after it instead,
        # an empty rank would start the all-reduce first and the ranks' collectives would cross (a hang).
        return [_KeepInGraph.apply(out, self.weight_table) for out in outputs]

    def output_dist(self, ctx: MemRecContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._add_finish(ctx, self.token_ebc.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: MemRecContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def _add_finish(self, ctx: MemRecContext, awaitable: LazyAwaitable[KeyedTensor]) -> LazyAwaitable[KeyedTensor]:
        assert ctx.aux is not None, "input_dist must run before the output dist"
        awaitable.callbacks.append(partial(self._finish, aux=ctx.aux, bags=ctx.bags))
        return awaitable

    def _finish(self, kt: KeyedTensor, aux: MemRecAux, bags: Optional[FactoredBags] = None) -> KeyedTensor:
        if bags is not None:
            # alpha gives the weight table its gradient from the outputs
            order = key_order(kt.keys(), self._feature_index, kt.values().device, self._key_orders)
            alpha = bag_alpha(bags, self.weight_table, len(kt.keys()), order)
            kt = with_values(kt, weight_grad_from_outputs(kt.values(), alpha))
        return self._layout.finish(kt, aux, self.weight_table)

    # ---- ShardedModule plumbing ---------------------------------------------------------------
    def create_context(self) -> MemRecContext:
        return MemRecContext()

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, _ in self.token_ebc.named_parameters(prefix=TOKEN_EBC):
            yield append_prefix(prefix, name)

    @property
    def unsharded_module_type(self) -> Type[nn.Module]:
        return self._unsharded_type


def _check_plan(plan: Dict[str, ParameterSharding], token_names: List[str], weight_name: str) -> None:
    """The plan must place every token table and nothing else (the weight table is not a table)."""
    missing = [name for name in token_names if name not in plan]
    if missing:
        raise ValueError(f"sharding plan lacks MEM-REC token tables {missing}; planned: {sorted(plan)}")
    extra = sorted(set(plan) - set(token_names))
    if extra:
        hint = (f" ({weight_name!r} is MEM-REC's replicated weight table: a dense parameter that DDP all-reduces, "
                "never planned; drop it from the plan and from the constraints)" if weight_name in extra else "")
        raise ValueError(f"sharding plan places {extra}, which are not MEM-REC token tables of this module "
                         f"(tables: {token_names}){hint}")


class MemRecEmbeddingBagCollectionSharder(InnerEBCSharder[MemRecEmbeddingBagCollection]):
    """Sharder of :class:`MemRecEmbeddingBagCollection`; the token tables go through ``ebc_sharder``
    (default :class:`RowWiseCapableEBCSharder`). Pass the same instance to the planner and to DMP.

    Only the token tables are shardable: the weight table is replicated (see the module docstring), so the
    planner never sees it and every plan it makes is valid.
    """

    def shardable_parameters(self, module: MemRecEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return dict(self._ebc_sharder.shardable_parameters(module.token_ebc))

    @property
    def module_type(self) -> Type[MemRecEmbeddingBagCollection]:
        return MemRecEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedMemRecEmbeddingBag]:
        return ShardedMemRecEmbeddingBag


class MemRecPerSampleEmbeddingBagSharder(MemRecEmbeddingBagCollectionSharder):
    """Sharder of :class:`MemRecPerSampleEmbeddingBag` (DMP looks sharders up by exact module type)."""

    @property
    def module_type(self) -> Type[MemRecPerSampleEmbeddingBag]:  # type: ignore[override]
        return MemRecPerSampleEmbeddingBag


register_sharder(MemRecEmbeddingBagCollection, MemRecEmbeddingBagCollectionSharder)
register_sharder(MemRecPerSampleEmbeddingBag, MemRecPerSampleEmbeddingBagSharder)
