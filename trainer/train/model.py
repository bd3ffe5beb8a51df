"""Model assembly: registered sparse arch + torchrec.models.dlrm dense part + training wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN

from embeddings import registry
from embeddings.types import MemoryReport, SparseArchContext, SparseArchSpec
from trainer.config import Config
from trainer.data.records import Batch
from trainer.strict import from_dict

NUM_DENSE_FEATURES = 13


@dataclass
class SparseArch:
    """The built sparse arch with everything needed to shard and account for it."""

    spec: SparseArchSpec
    options: Any
    context: SparseArchContext
    module: nn.Module

    @property
    def ids(self) -> str:
        """"raw" (the module takes raw int64 ids) or "table" (the data path reduces ids mod rows first)."""
        return self.spec.id_mode(self.options)


def sparse_context(
    config: Config,
    feature_names: Sequence[str],
    num_embeddings_per_feature: Optional[Sequence[int]],
    device: torch.device,
    pooling_factors: Optional[Sequence[float]] = None,
    id_counts: Optional[Any] = None,
) -> SparseArchContext:
    return SparseArchContext(
        feature_names=list(feature_names),
        num_embeddings_per_feature=(None if num_embeddings_per_feature is None
                                    else [int(n) for n in num_embeddings_per_feature]),
        embedding_dim=config.model.embedding_dim,
        device=device,
        pooling_factors=pooling_factors,
        id_counts=id_counts,
    )


def build_sparse_arch(config: Config, ctx: SparseArchContext, source: str = "config") -> SparseArch:
    """Build the method chosen by ``embeddings.kind`` with its strictly checked options."""
    spec = registry.get(config.embeddings.kind)
    options: Any = from_dict(spec.options_type, config.embeddings.options, source=source, prefix="embeddings.options")
    module = spec.build(ctx, options)
    return SparseArch(spec=spec, options=options, context=ctx, module=module)


def memory_report(arch: SparseArch, sparse_optimizer: str) -> MemoryReport:
    return arch.spec.memory(arch.module, arch.context, arch.options, sparse_optimizer)


def build_dlrm(config: Config, arch: SparseArch, dense_device: torch.device) -> nn.Module:
    """DLRM (dot interaction) or DLRM-DCN around the sparse arch, or the method's own head if it has one."""
    m = config.model
    sparse_module = arch.module
    head = arch.spec.dense_head(arch.options) if arch.spec.dense_head is not None else None
    if head is not None:
        if m.arch != "dlrm":
            raise ValueError(f"embeddings.kind={arch.spec.name} with these options brings its own head; "
                             f"model.arch must be 'dlrm', got {m.arch!r}")
        return head(sparse_module, NUM_DENSE_FEATURES, list(m.dense_arch_layer_sizes),
                    list(m.over_arch_layer_sizes), dense_device)
    if m.arch == "dlrm":
        return DLRM(
            embedding_bag_collection=sparse_module,  # type: ignore[arg-type]
            dense_in_features=NUM_DENSE_FEATURES,
            dense_arch_layer_sizes=list(m.dense_arch_layer_sizes),
            over_arch_layer_sizes=list(m.over_arch_layer_sizes),
            dense_device=dense_device,
        )
    return DLRM_DCN(
        embedding_bag_collection=sparse_module,  # type: ignore[arg-type]
        dense_in_features=NUM_DENSE_FEATURES,
        dense_arch_layer_sizes=list(m.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(m.over_arch_layer_sizes),
        dcn_num_layers=m.dcn_num_layers,
        dcn_low_rank_dim=m.dcn_low_rank_dim,
        dense_device=dense_device,
    )


class TrainModel(nn.Module):
    """Wraps a logit model for TrainPipelineSparseDist: ``forward(batch) -> (loss, outputs)``.

    ``outputs`` = (loss, logits, labels, valid mask, oracle logits) all detached; padded eval rows
    (``valid == False``) are excluded from the loss.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="none")

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        labels = batch.labels.float()
        per_sample = self.loss_fn(logits, labels)
        valid = batch.valid
        if valid is None:
            loss = per_sample.mean()
            valid = torch.ones_like(labels, dtype=torch.bool)
        else:
            loss = (per_sample * valid).sum() / valid.sum().clamp(min=1)
        oracle = batch.oracle_logits if batch.oracle_logits is not None else torch.full_like(labels, float("nan"))
        return loss, (loss.detach(), logits.detach(), labels, valid, oracle)
