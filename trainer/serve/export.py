"""Inference export: a training checkpoint's model as one artifact whose embedding lookups run on fbgemm's
inference TBE at a chosen table precision.

``compactrec export CONFIG [overrides] --out model.pt [--precision fp32|fp16|int8|int4] [--checkpoint DIR]``
runs in one process with no process group: it builds the unsharded model (DLRM / DLRM-DCN / MEM-REC's
per-sample head around the configured embedding module), loads the checkpoint's model part into it with
torch.distributed.checkpoint (which gathers row-wise and other shards written by any number of ranks into
whole tensors), quantizes the sparse module's inner tables (``embeddings.quant.split_sparse``) and writes one
file (``torch.save``, written to a temporary name and renamed) that holds data only - tensors, dicts, lists,
strings and numbers, no pickled object (checked before writing, :func:`check_plain`), so it reads with
``torch.load(weights_only=True)``::

    {"format": "compactrec-inference", "version": 4, "precision": "int8",
     "config": resolved configuration (dict), "embeddings": kind, "ids": "raw",
     "feature_names": [...], "num_embeddings_per_feature": [...] or null (a method sized in rows),
     "sparse_path": where the sparse module sits in the model ("sparse_arch.embedding_bag_collection"),
     "sparse": {"form": embeddings.quant form name, "configs": inner table configs (dicts), "is_weighted": bool,
                "tables": {table: {"weight": quantized rows, "scale_shift": ... or None}},
                "buffers": the module's buffers (salts, LMA dictionary, hot-id keys, vocabulary),
                "parameters": its other parameters (MEM-REC's weight table),
                "state": what the module is rebuilt from beyond the config (the spec's InferenceHooks: hot
                         values per feature, the LMA dictionary's size), tensors},
     "dense_state_dict": every other tensor of the model (the MLPs, fp32),
     "table_bytes": bytes of the quantized tables, "versions": {torch, fbgemm_gpu, torchrec, compactrec},
     "checkpoint": the checkpoint's COMPLETE.json (+ path), or null for an in-process export,
     "sha256": {"dense_state_dict.<key>" / "sparse.tables.<table>.weight" / ...: sha256 of every tensor of the
                payload (``tensor_checksums``), compared at load: a damaged file is an error naming it}}

``trainer.serve.artifact.load`` reads it back as a module ``(dense, KJT of raw ids) -> logits`` with only the
installed package: the method's module is rebuilt from the stored config and state (no config file, LMA index or
id-count file), its tensors loaded into it; no process group. Version 3 and older pickled the layout object;
they are refused (export again).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from embeddings import registry
from embeddings.inference_state import hooks_of
from embeddings.integrity import tensor_sha256
from embeddings.quant import check_precision, split_sparse
from trainer.train import checkpoint
from trainer.config import Config
from trainer.strict import to_dict

logger = logging.getLogger(__name__)

FORMAT = "compactrec-inference"
VERSION = 4  # 3: sha256 of every tensor; 4: data only (the layout rebuilt from config + state)


def build_unsharded(config: Config, feature_names: Any, sizes: Any, device: torch.device,
                    id_counts: Any = None) -> Tuple[nn.Module, Any]:
    """The logit model and its ``SparseArch`` in one plain process (float tables)."""
    from trainer.train.model import build_dlrm, build_sparse_arch, sparse_context

    arch = build_sparse_arch(config, sparse_context(config, feature_names, sizes, device, id_counts=id_counts))
    return build_dlrm(config, arch, dense_device=device), arch


def sparse_path(model: nn.Module, sparse: nn.Module) -> str:
    """The name of ``sparse`` inside ``model`` (``sparse_arch.embedding_bag_collection`` for every head here)."""
    for name, module in model.named_modules():
        if module is sparse:
            return name
    raise ValueError(f"the sparse module ({type(sparse).__name__}) is not inside the model")


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out: Dict[str, str] = {"torch": str(torch.__version__)}
    for package in ("fbgemm_gpu", "torchrec", "compactrec"):
        try:
            out[package] = md.version({"fbgemm_gpu": "fbgemm-gpu-cpu"}.get(package, package))
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def tensor_checksums(payload: Any, prefix: str = "") -> Dict[str, str]:
    """sha256 of every tensor reachable through the dicts, lists and tuples of ``payload`` (the ``sha256`` entry
    itself excluded), keyed by its dotted path."""
    out: Dict[str, str] = {}
    items = (payload.items() if isinstance(payload, dict)
             else enumerate(payload) if isinstance(payload, (list, tuple)) else ())
    for key, value in items:
        if not prefix and key == "sha256":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = tensor_sha256(value)
        else:
            out.update(tensor_checksums(value, name + "."))
    return out


PLAIN = (str, int, float, bool, type(None))


def check_plain(payload: Any, where: str = "artifact") -> None:
    """A ValueError naming the entry unless ``payload`` is tensors, dicts with string keys, lists, tuples,
    strings, numbers and None: what ``torch.load(weights_only=True)`` reads back without running code."""
    if isinstance(payload, (torch.Tensor, *PLAIN)):
        return
    if isinstance(payload, dict):
        for key, value in payload.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is a {type(key).__name__}, not a string")
            check_plain(value, f"{where}.{key}")
        return
    if isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            check_plain(value, f"{where}.{i}")
        return
    raise ValueError(f"{where} is a {type(payload).__module__}.{type(payload).__qualname__}: an inference artifact "
                     "holds tensors and plain data only (a method's inference state must be tensors)")


def write_artifact(model: nn.Module, sparse: nn.Module, config: Config, feature_names: Any, sizes: Any,
                   precision: str, out: Path, checkpoint_meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Quantize ``model``'s sparse module (``sparse``) to ``precision`` and write the artifact to ``out``."""
    check_precision(precision, "--precision")
    path = sparse_path(model, sparse)
    parts = split_sparse(sparse, precision)
    if parts.form != "full":  # a plain EBC is rebuilt from its table configs alone
        parts.state = {k: v.detach().cpu().contiguous()
                       for k, v in hooks_of(registry.get(config.embeddings.kind)).state(sparse).items()}
    dense = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(path + ".")}
    payload = {
        "format": FORMAT, "version": VERSION, "precision": precision,
        "config": to_dict(config), "embeddings": config.embeddings.kind, "ids": "raw",
        "feature_names": list(feature_names),
        "num_embeddings_per_feature": None if sizes is None else [int(n) for n in sizes],
        "sparse_path": path,
        "sparse": {"form": parts.form, "configs": parts.configs, "is_weighted": parts.is_weighted,
                   "tables": parts.tables, "buffers": parts.buffers, "parameters": parts.parameters,
                   "state": parts.state},
        "dense_state_dict": dense, "table_bytes": parts.table_bytes(), "versions": versions(),
        "checkpoint": checkpoint_meta,
    }
    payload["sha256"] = tensor_checksums(payload)
    check_plain(payload)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values())
    logger.info("exported %s model (%s tables, %.1f MiB; dense %.1f MiB) to %s", config.embeddings.kind, precision,
                parts.table_bytes() / 2**20, dense_bytes / 2**20, out)
    return {"path": str(out), "precision": precision, "table_bytes": parts.table_bytes(), "dense_bytes": dense_bytes,
            "file_bytes": out.stat().st_size}


def export_checkpoint(config: Config, out: Path, checkpoint_dir: Optional[Path] = None,
                      precision: str = "fp32") -> Dict[str, Any]:
    """Write the artifact of ``checkpoint_dir`` (default: the newest complete one of ``training.run_dir``)."""
    from trainer.prepare.dataset_info import dataset_info

    check_precision(precision, "--precision")
    run_dir = Path(config.training.run_dir)
    path = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint.checkpoint_root(run_dir)} to export")
    meta = checkpoint.verify_checkpoint(path)  # a damaged checkpoint is an error naming the file
    info = dataset_info(config, require_data=False)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                                  info.id_counts)
    # the checkpoint holds TrainModel's state ("model." + the logit model's keys)
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(path))  # in place; a key missing from the checkpoint raises
    model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()}, strict=True)
    done = write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature,
                          precision, Path(out), {"path": str(path), **meta})
    logger.info("checkpoint %s (step %d) exported", path, meta["step"])
    return {**done, "checkpoint": str(path), "step": meta["step"]}


__all__ = ["FORMAT", "VERSION", "build_unsharded", "check_plain", "export_checkpoint", "write_artifact"]
