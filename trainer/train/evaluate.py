"""Exact global evaluation: AUC over every rank's predictions (torchmetrics gathers them), logloss by
all-reduced sums, and the same for the data's oracle logit when it has one."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC


class Evaluator:
    """Accumulates one evaluation pass; ``compute()`` is collective (every rank must call it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.auc = BinaryAUROC().to(device)
        self.oracle_auc = BinaryAUROC().to(device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # bce, n, oracle bce, oracle n

    def update(self, outputs: Tuple[torch.Tensor, ...]) -> None:
        _, logits, labels, valid, oracle = outputs
        logits, labels, oracle = logits[valid].float(), labels[valid].float(), oracle[valid].float()
        if logits.numel() == 0:
            return
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite model output during evaluation")
        self.auc.update(torch.sigmoid(logits), labels.long())
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        self.sums[0] += bce.double()
        self.sums[1] += logits.numel()
        has_oracle = torch.isfinite(oracle)
        if has_oracle.any():
            o, lab = oracle[has_oracle], labels[has_oracle]
            self.oracle_auc.update(torch.sigmoid(o), lab.long())
            self.sums[2] += torch.nn.functional.binary_cross_entropy_with_logits(o, lab, reduction="sum").double()
            self.sums[3] += o.numel()

    def compute(self) -> Dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        out: Dict[str, float] = {"samples": float(sums[1])}
        out["auc"] = float(self.auc.compute()) if sums[1] > 0 else math.nan
        out["logloss"] = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
        if sums[3] > 0:
            out["oracle_auc"] = float(self.oracle_auc.compute())
            out["oracle_logloss"] = float(sums[2] / sums[3])
        return out
