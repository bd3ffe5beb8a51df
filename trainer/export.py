"""Inference export: a training checkpoint's model as one file of unsharded weights.

``compactrec export CONFIG [overrides] --out model.pt [--checkpoint DIR]`` runs in one process with no process
group: it builds the unsharded model (DLRM or DLRM-DCN around the configured embedding module: a plain
``EmbeddingBagCollection`` for ``full``, the compressed module otherwise), loads the checkpoint's model part
into it with torch.distributed.checkpoint (which gathers row-wise and other shards written by any number of
ranks into whole tensors) and saves::

    {"format": "compactrec-inference", "version": 1,
     "state_dict": logit model's state_dict (plain tensors, on CPU),
     "config": resolved configuration (dict), "embeddings": kind, "ids": "table" | "raw",
     "feature_names": [...], "num_embeddings_per_feature": [...], "checkpoint": {...its COMPLETE.json}}

``state_dict`` loads with ``load_state_dict(strict=True)`` into the same architecture built in a plain
single process (``load_inference_model`` does that; for ``full`` it is a stock torchrec ``DLRM`` over a stock
``EmbeddingBagCollection``). ``ids == "table"`` means the model expects ids already reduced modulo each
feature's table size (``trainer.ids.reduce_ids``), as in training; ``raw`` means raw 64-bit ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer import checkpoint
from trainer.config import Config
from trainer.strict import from_dict, to_dict

logger = logging.getLogger(__name__)

FORMAT = "compactrec-inference"
VERSION = 1


def _build_unsharded(config: Config, feature_names: Any, sizes: Any, device: torch.device,
                     id_counts: Any = None) -> Tuple[nn.Module, Any]:
    from trainer.model import build_dlrm, build_sparse_arch, sparse_context

    arch = build_sparse_arch(config, sparse_context(config, feature_names, sizes, device, id_counts=id_counts))
    return build_dlrm(config, arch, dense_device=device), arch


def export_checkpoint(config: Config, out: Path, checkpoint_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Write the inference file for ``checkpoint_dir`` (default: the newest of ``training.run_dir``)."""
    from trainer.datasets import dataset_info

    run_dir = Path(config.training.run_dir)
    path = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint.checkpoint_root(run_dir)} to export")
    meta = checkpoint.read_metadata(path)
    info = dataset_info(config, require_data=False)
    model, arch = _build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                                   info.id_counts)
    # the checkpoint holds TrainModel's state ("model." + the logit model's keys)
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(path))  # in place; a key missing from the checkpoint raises
    model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()}, strict=True)
    payload = {
        "format": FORMAT, "version": VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": to_dict(config), "embeddings": config.embeddings.kind, "ids": arch.ids,
        "feature_names": list(info.feature_names),
        "num_embeddings_per_feature": (None if info.num_embeddings_per_feature is None
                                       else [int(n) for n in info.num_embeddings_per_feature]),
        "checkpoint": {"path": str(path), **meta},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    size = sum(t.numel() * t.element_size() for t in payload["state_dict"].values())
    logger.info("exported %s (step %d) to %s: %d tensors, %.1f MiB", path, meta["step"], out,
                len(payload["state_dict"]), size / 2**20)
    return {"path": str(out), "checkpoint": str(path), "step": meta["step"], "tensors": len(payload["state_dict"]),
            "bytes": size}


def read_export(path: Path) -> Dict[str, Any]:
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a CompactRec inference export (no format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: export version {payload.get('version')}, this code reads {VERSION}")
    return payload


def load_inference_model(path: Path, device: torch.device = torch.device("cpu")) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the exported model in this process (no process group) and load its weights strictly.

    Returns ``(model, payload)``; ``model(dense_features, sparse_features)`` gives logits.
    """
    payload = read_export(path)
    config = from_dict(Config, payload["config"], source=str(path))
    model, _ = _build_unsharded(config, payload["feature_names"], payload["num_embeddings_per_feature"], device)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    return model, payload


__all__ = ["export_checkpoint", "load_inference_model", "read_export"]
