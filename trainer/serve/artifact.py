"""Loading an inference artifact (``compactrec export``) as a module: the Python API of ``compactrec score``.

    from trainer.serve.artifact import load

    model = load("model.pt")                  # or load(path, device=torch.device("cuda"))
    logits = model(dense, kjt)                # dense [B, 13] float32, kjt: KeyedJaggedTensor of raw int64 ids
    probabilities = torch.sigmoid(logits)     # [B]
    model.metadata["precision"], model.metadata["embeddings"], model.metadata["feature_names"]

The KJT carries the 26 sparse features by name (``model.metadata["feature_names"]``; extra keys are ignored,
order is free) with *raw* ids, any int64, for every method: the compressed methods hash them, ``full`` reduces
them ``id mod rows`` per feature (a no-op on contiguous ids such as TorchRec's preprocessed Criteo). Dense
features are the model's inputs as the data readers produce them (``log(x + 1)``-style, see
``trainer/data/records.py``).

Only the installed package is needed: no config file, no LMA index or id-count file, no process group. The
embedding lookups run on fbgemm's inference TBE at the artifact's precision; the id hashing runs on the
registered operator ``compactrec::salted_hash`` (``embeddings.ops.salted_hash``).

The file is data only and is read with ``torch.load(weights_only=True)``: a file that carries a pickled object
(anything that load refuses: a class, a function, a ``__reduce__``) is refused with an :class:`ArtifactError`
naming it and what it carries (``trainer.serve.pickle_scan``), and nothing in it runs; an artifact of format
version 3 or older (which pickled the layout) is told to be exported again. The method's module is rebuilt by the
installed package from the stored config and state (its spec's ``InferenceHooks``), its tensors loaded into it.
The config's ``embeddings.plugins`` are imported by name, as training does: installed modules, not code from the
file.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.ops import salted_hash as fused_hash
from embeddings.inference_state import hooks_of
from embeddings.quant import PRECISIONS, SparseParts, build_sparse, config_dict, form_of, fused_hashing, inner_ebc
from trainer.config import Config
from trainer.serve.export import FORMAT, VERSION, tensor_checksums, versions
from trainer.serve.pickle_scan import scan
from trainer.strict import from_dict

logger = logging.getLogger(__name__)

REQUIRED = ("precision", "config", "embeddings", "feature_names", "num_embeddings_per_feature", "sparse_path",
            "sparse", "dense_state_dict", "versions", "sha256")
SPARSE_REQUIRED = ("form", "configs", "is_weighted", "tables", "buffers", "parameters", "state")
EXPORT_COMMAND = "compactrec export CONFIG --out ARTIFACT --precision P"


class ArtifactError(ValueError):
    """An inference artifact that cannot be used here: not one, unreadable, another format version, or a
    precision this installation's kernel lacks. The message names the file."""


def read_artifact(path: Union[str, Path]) -> Dict[str, Any]:
    """The artifact's payload, checked: format, version, required entries, precision."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inference artifact {str(path)!r} does not exist; write one with `{EXPORT_COMMAND}`")
    try:
        # data only: weights_only refuses any pickled object before it is built, so nothing in the file runs;
        # memory-mapped: the tables are copied from the file into the kernel's storage, never held twice
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: not a readable CompactRec inference artifact ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a CompactRec inference artifact (no format {FORMAT!r}); write one with "
                            f"`{EXPORT_COMMAND}`")
    if payload.get("version") != VERSION:
        raise ArtifactError(f"{path}: inference artifact format version {payload.get('version')!r}, this code reads "
                            f"version {VERSION}; export the checkpoint again with `{EXPORT_COMMAND}`")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ArtifactError(f"{path}: inference artifact lacks {missing} (a damaged or hand-edited file)")
    recorded, actual = payload["sha256"], tensor_checksums(payload)
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{path}: inference artifact has no valid sha256 entry (a damaged or hand-edited file)")
    differ = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
    if differ:
        raise ArtifactError(f"{path}: inference artifact is damaged: tensor(s) {differ[:5]} differ from the sha256 "
                            f"it records; export the checkpoint again with `{EXPORT_COMMAND}`")
    if payload["precision"] not in PRECISIONS:
        raise ArtifactError(f"{path}: table precision {payload['precision']!r} is not one fbgemm's inference TBE "
                            f"runs in this installation ({', '.join(PRECISIONS)})")
    sparse = payload["sparse"]
    if not isinstance(sparse, dict) or not isinstance(sparse.get("form"), str):
        raise ArtifactError(f"{path}: inference artifact has no valid sparse module (form "
                            f"{sparse.get('form') if isinstance(sparse, dict) else sparse!r})")
    missing = [k for k in SPARSE_REQUIRED if k not in sparse]
    if missing:
        raise ArtifactError(f"{path}: inference artifact's sparse module lacks {missing} (a damaged or hand-edited "
                            "file)")
    here = versions()
    if payload["versions"].get("compactrec") != here["compactrec"]:
        logger.warning("%s was written by compactrec %s, this is %s", path, payload["versions"].get("compactrec"),
                       here["compactrec"])
    return payload


def _refused(path: Path, exc: Exception) -> ArtifactError:
    """Why ``torch.load(weights_only=True)`` refused ``path``, read from its opcodes without running them."""
    found = scan(path)
    if found.format == FORMAT and found.version is not None and found.version != VERSION:
        return ArtifactError(f"{path}: inference artifact format version {found.version} holds pickled package "
                             f"objects (its layout), which this code does not load (version {VERSION} is data only); "
                             f"nothing in the file was run. Export its checkpoint again with `{EXPORT_COMMAND}`")
    carries = ", ".join(sorted(set(found.globals))[:5]) or str(exc).strip().splitlines()[0][:200]
    return ArtifactError(f"{path}: refused: the file carries pickled objects ({carries}), which a CompactRec "
                         "inference artifact never holds; nothing in it was run (read with "
                         f"torch.load(weights_only=True)). Write artifacts with `{EXPORT_COMMAND}`")


class InferenceModel(nn.Module):
    """``(dense [B, 13], KJT of raw ids) -> logits [B]`` around the exported model; ``metadata`` holds the
    artifact's format, version, precision, embeddings kind, feature names, table sizes, config and checkpoint."""

    def __init__(self, model: nn.Module, metadata: Dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense_features, sparse_features).squeeze(-1)


def _build(payload: Dict[str, Any], source: str, device: torch.device) -> nn.Module:
    from trainer.train.model import SparseArch, build_dlrm, sparse_context

    config = from_dict(Config, payload["config"], source=source)
    registry.load_plugins(config.embeddings.plugins)
    spec = registry.get(payload["embeddings"])
    options: Any = from_dict(spec.options_type, config.embeddings.options, source=source, prefix="embeddings.options")
    s = payload["sparse"]
    ctx = sparse_context(config, payload["feature_names"], payload["num_embeddings_per_feature"], device)
    layout = None
    if s["form"] != "full":  # the method's module rebuilt by this code from the config and the stored state
        rebuilt = hooks_of(spec).rebuild(dataclasses.replace(ctx, device=torch.device("meta")), options, s["state"])
        tables = [config_dict(c) for c in inner_ebc(rebuilt).embedding_bag_configs()]
        if form_of(rebuilt) != s["form"] or tables != s["configs"]:
            raise ArtifactError(f"{source}: the {payload['embeddings']} module this code builds from the artifact's "
                                f"config is a {form_of(rebuilt)!r} module with tables {tables}; the artifact holds a "
                                f"{s['form']!r} module with {s['configs']}")
        layout = fused_hashing(rebuilt.layout)
    parts = SparseParts(form=s["form"], precision=payload["precision"], configs=s["configs"],
                        is_weighted=s["is_weighted"], tables=s["tables"], layout=layout, buffers=s["buffers"],
                        parameters=s["parameters"], state=s["state"])
    if getattr(getattr(parts.layout, "options", None), "hash_backend", None) == "fused":
        fused_hash.ensure_op()  # register compactrec::salted_hash before the first forward
    sparse = build_sparse(parts, device)
    model = build_dlrm(config, SparseArch(spec=spec, options=options, context=ctx, module=sparse), dense_device=device)
    prefix = payload["sparse_path"] + "."
    wanted = {k for k in model.state_dict() if not k.startswith(prefix)}
    given = set(payload["dense_state_dict"])
    if wanted != given:
        raise ArtifactError(f"{source}: the model of this code has dense tensors missing from the artifact "
                            f"{sorted(wanted - given)[:5]} and the artifact has unknown ones {sorted(given - wanted)[:5]}")
    model.load_state_dict(payload["dense_state_dict"], strict=False)
    return model


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> InferenceModel:
    """The artifact at ``path`` as an :class:`InferenceModel` on ``device``, in eval mode."""
    payload = read_artifact(path)
    try:
        model = _build(payload, str(path), torch.device(device))
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: the artifact does not fit this code's {payload['embeddings']} model "
                            f"({type(exc).__name__}: {str(exc)[:500]})") from exc
    metadata = {k: payload.get(k) for k in ("format", "version", "precision", "embeddings", "ids", "feature_names",
                                            "num_embeddings_per_feature", "config", "checkpoint", "table_bytes",
                                            "versions")}
    return InferenceModel(model, metadata).eval()


__all__ = ["ArtifactError", "InferenceModel", "load", "read_artifact"]
