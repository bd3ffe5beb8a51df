"""Optimizers: fused sparse optimizers applied in backward to the embedding tables (fbgemm TBE), a
dense optimizer for everything else (MLPs and replicated, data-parallel tables), combined."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple, Type

import torch
from torch import nn
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


def combined_optimizer(model: nn.Module, cfg: OptimizerConfig) -> CombinedOptimizer:
    """Fused (sharded tables) + dense optimizer over everything not optimised in backward."""
    dense: Dict[str, Any] = dict(in_backward_optimizer_filter(model.named_parameters()))
    parts: List[Any] = [model.fused_optimizer]  # type: ignore[attr-defined]
    if dense:
        parts.append(KeyedOptimizerWrapper(dense, dense_optimizer_factory(cfg)))
    return CombinedOptimizer(parts)


def named_dense(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    return in_backward_optimizer_filter(model.named_parameters())
