"""The inference model as a ``torch.export`` program (``.pt2``): dense features and raw ids in, logits out.

``compactrec export CONFIG --format pt2 --out model.pt2 [--precision P]`` (or :func:`export_program` on a loaded
eager artifact) writes, with ``torch.export.save``, a program whose inputs are plain tensors::

    dense    float32 [B, 13]          the dense features, as for the eager model
    values   int64   [N]              the raw ids of every feature, feature-major (feature 0's ids of sample 0,
                                      of sample 1, ..., then feature 1's ...), features in ``feature_names`` order
    lengths  int32   [F * B]          ids per (feature, sample), feature-major: the KJT's lengths
    -> logits float32 [B]

``B`` (batch, >= 1) and ``N`` (ids, >= 0) are dynamic. The file's ``extra/compactrec.json`` holds the metadata
(format ``compactrec-pt2``, feature names, precision, method, config, versions). It loads with
``torch.export.load`` in a process that has torch, fbgemm_gpu and torchrec imported and CompactRec's operators
registered (``embeddings.ops.salted_hash.ensure_op()``, ``embeddings.ops.chunk_bag.ensure_ops()``), with no
config file and no other CompactRec module; :func:`load_program` does that and returns a callable
``(dense, KJT of raw ids by feature name) -> logits`` like the eager model. ``torch.export.load`` can unpickle
parts of an archive (weights or constants saved with pickle, custom objects, sample inputs): load programs you
trust; :func:`load_program` first refuses an archive with any such part (:func:`check_archive`).

The program builds the KeyedJaggedTensor inside and runs the eager artifact's model (the method's id maths, the
quantized EBC on fbgemm's inference TBE, the MLPs). It appends one padding sample (id 0 in every feature) before
the model and drops its logit after: the traced batch is then always >= 2 and every feature has an id, so no
size-0/1 specialisation (broadcasting, a hot-row search's small-input branch) is baked into the program; each
sample's logit depends on its own ids only, so the padding changes no output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.serve.artifact import ArtifactError, InferenceModel

logger = logging.getLogger(__name__)

FORMAT = "compactrec-pt2"
VERSION = 1
METADATA_FILE = "compactrec.json"
MAX_BATCH = 1 << 24
MAX_IDS = 1 << 40

#: (method, precision) pairs that do not export with this torch / fbgemm, and why (checked by the tests).
UNSUPPORTED: Dict[Tuple[str, str], str] = {}


def register_ops() -> None:
    """CompactRec's ``compactrec::*`` operators (with their fake kernels) in this process."""
    from embeddings.ops import chunk_bag, salted_hash

    salted_hash.ensure_op()
    chunk_bag.ensure_ops()


class ScoringProgram(nn.Module):
    """``(dense [B, D], values [N] int64, lengths [F * B] int32) -> logits [B]`` around an eager model
    ``(dense, KJT) -> logits`` whose KJT holds ``feature_names`` in that order (feature-major)."""

    def __init__(self, model: nn.Module, feature_names: List[str]) -> None:
        super().__init__()
        self.model = model
        self.feature_names = list(feature_names)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        num_features, batch, n = len(self.feature_names), dense.shape[0], values.shape[0]
        torch._check(lengths.shape[0] == num_features * batch)
        counts = lengths.view(num_features, batch)
        per_feature = counts.sum(1).to(torch.int64)
        features = torch.arange(num_features, dtype=torch.int64, device=values.device)
        feature_of_value = torch.repeat_interleave(features, per_feature, output_size=n)
        # the padding sample's id (0) sits after each feature's ids: value i moves by its feature's index
        padded = values.new_zeros(n + num_features)
        padded = padded.index_copy(0, torch.arange(n, device=values.device) + feature_of_value, values)
        padded_lengths = torch.cat([counts, counts.new_ones(num_features, 1)], dim=1).reshape(-1)
        padded_dense = torch.cat([dense, dense.new_zeros(1, dense.shape[1])], dim=0)
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=padded, lengths=padded_lengths, stride=batch + 1)
        return self.model(padded_dense, kjt).reshape(-1)[:batch]


def program_inputs(kjt: KeyedJaggedTensor, feature_names: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values int64, lengths int32)`` of ``kjt``'s features ``feature_names`` in that order, feature-major;
    a ValueError naming the missing ones (extra keys are ignored, as by the eager model)."""
    keys = kjt.keys()
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(f"input KJT lacks features {missing} (has {keys})")
    if kjt.weights_or_none() is not None or kjt.variable_stride_per_key():
        raise ValueError("the pt2 program takes unweighted KJTs of raw ids with one batch size for every feature")
    if keys != feature_names:
        kjt = kjt.permute([keys.index(f) for f in feature_names])
    return kjt.values().to(torch.int64), kjt.lengths().to(torch.int32)


def example_inputs(num_features: int, dense_features: int, batch: int = 4, bag: int = 2,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random program inputs: ``batch`` samples, 0..``bag`` raw ids per (feature, sample)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, bag + 1, (num_features * batch,), generator=g, dtype=torch.int32)
    values = torch.randint(0, 1 << 40, (int(lengths.sum()),), generator=g, dtype=torch.int64)
    return torch.randn(batch, dense_features, generator=g), values, lengths


def check_exportable(method: str, precision: str) -> None:
    """A ValueError naming the method, the precision and the reason where the program cannot be exported."""
    reason = UNSUPPORTED.get((method, precision)) or UNSUPPORTED.get((method, "*"))
    if reason is not None:
        raise ValueError(f"--format pt2: the {method} model at {precision} does not export with torch "
                         f"{torch.__version__}: {reason}; use the eager artifact (--format eager)")


def _metadata(model: InferenceModel) -> Dict[str, Any]:
    keep = {k: v for k, v in model.metadata.items() if k not in ("format", "version")}
    return {"format": FORMAT, "version": VERSION, **keep}


def export_program(model: InferenceModel, out: Union[str, Path]) -> Dict[str, Any]:
    """Export the eager ``model`` (``trainer.serve.artifact.load``) as a torch.export program at ``out``."""
    meta = model.metadata
    names: List[str] = list(meta["feature_names"])
    from trainer.train.model import NUM_DENSE_FEATURES

    dense_dim = NUM_DENSE_FEATURES
    check_exportable(str(meta["embeddings"]), str(meta["precision"]))
    register_ops()
    program = ScoringProgram(model, names).eval()
    example = example_inputs(len(names), dense_dim)
    with torch.no_grad():
        program(*example)  # fills the layouts' device caches with real tensors before tracing (they would cache fakes)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        ids = torch.export.Dim("ids", min=0, max=MAX_IDS)
        try:
            exported = torch.export.export(program, example, dynamic_shapes=({0: batch}, {0: ids},
                                                                             {0: len(names) * batch}), strict=False)
        except Exception as exc:  # any tracing failure: name the method and precision, keep the cause
            raise ValueError(f"--format pt2: the {meta['embeddings']} model at {meta['precision']} does not export "
                             f"({type(exc).__name__}: {str(exc).strip()[:500]})") from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.pt2")  # torch.export.save wants a name ending in .pt2
    torch.export.save(exported, tmp, extra_files={METADATA_FILE: json.dumps(_metadata(model), default=str)})
    tmp.replace(out)
    logger.info("exported the %s model (%s tables) as a torch.export program to %s", meta["embeddings"],
                meta["precision"], out)
    return {"path": str(out), "precision": meta["precision"], "file_bytes": out.stat().st_size}


def export_checkpoint_program(config: Any, out: Union[str, Path], checkpoint_dir: Any = None,
                              precision: str = "fp32") -> Dict[str, Any]:
    """``compactrec export --format pt2``: the checkpoint's eager artifact (``export_checkpoint``, written to a
    temporary file and loaded back as ``trainer.serve.artifact.load`` does) exported as a program at ``out``."""
    import tempfile

    from trainer.serve.artifact import load
    from trainer.serve.export import export_checkpoint

    check_exportable(config.embeddings.kind, precision)
    with tempfile.TemporaryDirectory(prefix="compactrec-pt2-") as tmp:
        done = export_checkpoint(config, Path(tmp) / "model.pt", checkpoint_dir, precision=precision)
        written = export_program(load(done["path"]), out)
    return {**done, **written}


class ProgramModel(nn.Module):
    """A loaded program as ``(dense [B, 13], KJT of raw ids) -> logits [B]``, with the eager model's ``metadata``."""

    def __init__(self, program: torch.export.ExportedProgram, metadata: Dict[str, Any]) -> None:
        super().__init__()
        self.program = program.module()
        self.metadata = metadata
        self.feature_names: List[str] = list(metadata["feature_names"])

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        values, lengths = program_inputs(sparse_features, self.feature_names)
        return self.program(dense_features.to(torch.float32), values, lengths)

    def train(self, mode: bool = True) -> "ProgramModel":
        """An exported program is always in inference mode (``torch.export`` refuses ``train()``)."""
        if mode:
            raise NotImplementedError("a torch.export program is inference only; it has no training mode")
        return self


def is_program(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a torch.export archive (a zip holding ``archive_format``) rather than an eager artifact."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("archive_format") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_archive(path: Path) -> None:
    """Refuse a program whose loading would unpickle anything beyond plain tensors: ``torch.export.load`` reads
    weights and constants marked ``use_pickle`` (and custom / opaque objects) with an unrestricted unpickler and
    falls back to one for sample inputs that ``weights_only`` refuses. The programs written here hold raw tensor
    bytes only; this checks so, without running anything from the file."""
    import io
    import zipfile

    def refuse(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: refused: the program's {what} would be unpickled by torch.export.load "
                             "(which can run code from the file); programs written by `compactrec export --format "
                             "pt2` hold raw tensors only, nothing in the file was run")

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, entry in config.items():
                        kind = str(entry.get("path_name", ""))
                        if entry.get("use_pickle") or not kind.startswith(("weight_", "tensor_")):
                            raise refuse(f"entry {fqn!r} ({kind})")
                elif "/data/sample_inputs/" in name:
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except Exception as exc:  # weights_only refuses a pickled object: the fallback would run it
                        raise refuse(f"sample inputs {name!r}") from exc
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: not a readable torch.export program ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc


def load_program(path: Union[str, Path]) -> ProgramModel:
    """The program at ``path`` (``export_program``) as a :class:`ProgramModel`; CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"program {str(path)!r} does not exist; write one with "
                                "`compactrec export CONFIG --format pt2 --out model.pt2`")
    check_archive(path)
    register_ops()
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # torch.export.load raises many types for a wrong or damaged archive
        raise ArtifactError(f"{path}: not a readable torch.export program ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path}: a torch.export program without CompactRec metadata ({METADATA_FILE}); "
                            "write one with `compactrec export CONFIG --format pt2`")
    return ProgramModel(program, metadata)


__all__ = ["FORMAT", "ProgramModel", "ScoringProgram", "UNSUPPORTED", "check_archive", "check_exportable", "example_inputs",
           "export_checkpoint_program", "export_program", "is_program", "load_program", "program_inputs", "register_ops"]
