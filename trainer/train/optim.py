"""Optimizers: fused sparse optimizers applied in backward to the embedding tables (fbgemm TBE), the same
optimizer run densely for embedding tables the plan replicates (data_parallel tables are never fused), and a
dense optimizer for everything else (MLPs, MEM-REC's weight table), combined."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Set, Tuple, Type

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.config import OptimizerConfig


def sparse_optimizer(cfg: OptimizerConfig) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The optimizer class and kwargs fbgemm's fused TBE maps to SGD / EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD."""
    if cfg.sparse == "sgd":
        return torch.optim.SGD, {"lr": cfg.sparse_lr, "weight_decay": cfg.weight_decay}
    if cfg.sparse == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.sparse_lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return RowWiseAdagrad, {"lr": cfg.sparse_lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def dense_optimizer_factory(cfg: OptimizerConfig) -> Any:
    def make(params: Any) -> torch.optim.Optimizer:
        if cfg.dense == "sgd":
            return torch.optim.SGD(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
        if cfg.dense == "adagrad":
            return torch.optim.Adagrad(params, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay)

    return make


def embedding_table_parameters(sparse_module: nn.Module) -> List[nn.Parameter]:
    """Parameters of every EmbeddingBagCollection inside the sparse arch: these get fused optimizers."""
    params: List[nn.Parameter] = []
    for sub in sparse_module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            params.extend(sub.parameters())
    return params


def apply_sparse_optimizer(sparse_module: nn.Module, cfg: OptimizerConfig) -> None:
    """Must run before planning: the planner sizes optimizer state from it, DMP fuses it into TBE."""
    cls, kwargs = sparse_optimizer(cfg)
    params = embedding_table_parameters(sparse_module)
    if params:
        apply_optimizer_in_backward(cls, params, kwargs)


def replicated_table_ids(model: nn.Module) -> Set[int]:
    """ids of the embedding-table parameters a sharded model holds data_parallel (no optimizer in backward)."""
    ids: Set[int] = set()
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for table in module.embedding_bags.values():
                weight = getattr(table, "weight", None)
                if isinstance(weight, nn.Parameter) and weight.numel() and \
                        not hasattr(weight, "_in_backward_optimizers"):
                    ids.add(id(weight))
    return ids


def combined_optimizer(model: nn.Module, cfg: OptimizerConfig) -> CombinedOptimizer:
    """Fused (sharded tables) + the sparse optimizer, run densely, over replicated embedding tables (the same update
    as the fused one: a row without gradient does not move) + the dense optimizer over everything else."""
    rest: Dict[str, Any] = dict(in_backward_optimizer_filter(model.named_parameters()))
    replicated_ids = replicated_table_ids(model)
    tables = {name: p for name, p in rest.items() if id(p) in replicated_ids}
    dense = {name: p for name, p in rest.items() if id(p) not in replicated_ids}
    parts: List[Any] = [model.fused_optimizer]  # type: ignore[attr-defined]
    if tables:
        cls, kwargs = sparse_optimizer(cfg)
        parts.append(KeyedOptimizerWrapper(tables, lambda params: cls(params, **kwargs)))
    if dense:
        parts.append(KeyedOptimizerWrapper(dense, dense_optimizer_factory(cfg)))
    return CombinedOptimizer(parts)


def named_dense(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    return in_backward_optimizer_filter(model.named_parameters())
