"""The inference model compiled ahead of time with AOTInductor (``.pt2`` package): a shared library that Python
or a C++ program (``torch::inductor::AOTIModelPackageLoader``) runs without a Python interpreter.

``compactrec export CONFIG --format aoti --out model.pt2 [--precision P]`` (or :func:`compile_package` on a loaded
eager artifact) traces the same program as ``--format pt2`` (``trainer.serve.pt2.ScoringProgram``: dense float32
``[B, 13]``, values int64 ``[N]``, lengths int32 ``[F * B]`` feature-major -> logits float32 ``[B]``, ``B`` and
``N`` dynamic) and compiles it with ``torch._inductor.aoti_compile_and_package``. The package is a zip holding the
generated C++ and its compiled library; ``<name>/extra/compactrec.json`` holds the metadata (format
``compactrec-aoti``, the fields of the pt2 program's ``compactrec.json``), and the library carries the same JSON
under the model metadata key ``compactrec`` (``AOTIModelPackageLoader::get_metadata()`` in C++).

The bounds check. fbgemm's inference TBE checks the ids it is given with ``fbgemm::bounds_check_indices``, an
in-place operator AOTInductor does not compile ("input_tensor must be a FunctionalTensor"); in its default
``WARNING`` mode it also sets an out-of-range id to row 0 and carries on. Here every TBE of the quantized EBC is
traced with its ``bounds_check_mode_int`` set to ``BoundsCheckMode.NONE`` and with a check in plain torch ops in
front of it (:class:`CheckedTBE`): every id reaching the TBE must lie in ``[0, rows of its feature's table)``, and
``torch._assert_async`` (``aten._assert_async.msg``, which AOTInductor compiles into a runtime check that throws)
stops the call otherwise, with no output. The program also checks its inputs before anything is looked up:
``lengths >= 0`` and ``sum(lengths) == N``. Raw ids are never out of range by themselves: every method maps any
int64 to a row (the compressed ones hash, ``full`` reduces ``id mod rows``, as the eager artifact does), so the
check catches a damaged package or wrong id maths, never valid input: a bad row is an error, never a silent row 0.

Loading a package runs its compiled library: load packages you built or trust (no check can make native code
safe; the pickle check of ``trainer.serve.pt2.check_archive`` does not apply, the package has no pickled part).
:func:`load_package` returns a module ``(dense, KJT of raw ids by feature name) -> logits`` like
``trainer.serve.pt2.load_program``; ``compactrec score model.pt2`` recognises a package (:func:`is_package`).
The C++ program ``tests/trainer/cpp/aoti_score.cpp`` shows loading from C++: dlopen fbgemm_gpu's libraries and
CompactRec's operator library (:func:`operator_libraries` lists them) so the custom operators the package calls are
registered, then run the loader.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.serve import pt2
from trainer.serve.artifact import ArtifactError, InferenceModel

logger = logging.getLogger(__name__)

FORMAT = "compactrec-aoti"
VERSION = 1
METADATA_FILE = "extra/compactrec.json"
METADATA_KEY = "compactrec"
BAD_ID = ("compactrec: an id given to the embedding lookup is outside [0, rows) of its feature's table (a damaged "
          "package or wrong id maths; fbgemm's own bounds check is off in AOTInductor packages)")
BAD_LENGTHS = "compactrec: lengths must be >= 0 and sum to the number of values"


class CheckedTBE(nn.Module):
    """An fbgemm inference TBE with its own (in-place, not compilable) bounds check off and a functional one in
    front: ``indices`` per (feature, sample) bag as ``offsets`` cut them, each below its feature's
    ``rows_per_table`` and >= 0, or ``torch._assert_async`` fails."""

    def __init__(self, tbe: nn.Module) -> None:
        super().__init__()
        self.tbe = tbe

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = cast(torch.Tensor, self.tbe.rows_per_table)  # one entry per feature of this TBE
        features = rows.shape[0]
        lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
        batch = lengths.shape[0] // features
        limit = rows.view(features, 1).expand(features, batch).reshape(-1)
        limit = torch.repeat_interleave(limit, lengths, output_size=indices.shape[0])
        ids = indices.to(torch.int64)
        torch._assert_async(((ids >= 0) & (ids < limit)).all(), BAD_ID)
        return self.tbe(indices=indices, offsets=offsets, per_sample_weights=per_sample_weights)


def _tbe_lists(model: nn.Module) -> List[List[Any]]:
    """The lists of fbgemm inference TBEs inside ``model`` (TorchRec's quantized EBCs keep them in a plain list,
    ``_emb_modules``, that is not a submodule)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    found = []
    for module in model.modules():
        tbes = getattr(module, "_emb_modules", None)
        if isinstance(tbes, list) and tbes and all(isinstance(t, IntNBitTableBatchedEmbeddingBagsCodegen)
                                                   for t in tbes):
            found.append(tbes)
    return found


class checked_lookups:
    """Within the block, every TBE of ``model`` runs as a :class:`CheckedTBE` with fbgemm's check off; restored
    after (the caller's model is left as it was)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: List[Tuple[List[Any], List[Any], List[int]]] = []

    def __enter__(self) -> int:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        for tbes in _tbe_lists(self.model):
            self.saved.append((tbes, list(tbes), [t.bounds_check_mode_int for t in tbes]))
            for i, tbe in enumerate(list(tbes)):
                tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value
                tbes[i] = CheckedTBE(tbe)
        return sum(len(s[1]) for s in self.saved)

    def __exit__(self, *exc: Any) -> None:
        for tbes, original, modes in self.saved:
            for tbe, mode in zip(original, modes):
                tbe.bounds_check_mode_int = mode
            tbes[:] = original
        self.saved = []


class PackageProgram(pt2.ScoringProgram):
    """:class:`trainer.serve.pt2.ScoringProgram` that first checks its lengths (>= 0, summing to ``N``)."""

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ok = (lengths >= 0).all() & (lengths.to(torch.int64).sum() == values.shape[0])
        torch._assert_async(ok, BAD_LENGTHS)
        return super().forward(dense, values, lengths)


def export_for_package(model: InferenceModel) -> torch.export.ExportedProgram:
    """The eager ``model`` traced as the pt2 program, with the checked lookups (:class:`CheckedTBE`)."""
    from trainer.train.model import NUM_DENSE_FEATURES

    meta = model.metadata
    names: List[str] = list(meta["feature_names"])
    pt2.register_ops()
    program = PackageProgram(model, names).eval()
    example = pt2.example_inputs(len(names), NUM_DENSE_FEATURES)
    with torch.no_grad(), checked_lookups(model) as count:
        if not count:
            raise ValueError(f"--format aoti: no fbgemm inference TBE found in the {meta['embeddings']} model")
        program(*example)  # fills the layouts' device caches with real tensors before tracing
        batch = torch.export.Dim("batch", min=1, max=pt2.MAX_BATCH)
        ids = torch.export.Dim("ids", min=0, max=pt2.MAX_IDS)
        try:
            return torch.export.export(program, example, dynamic_shapes=({0: batch}, {0: ids},
                                                                          {0: len(names) * batch}), strict=False)
        except Exception as exc:  # any tracing failure: name the method and precision, keep the cause
            raise ValueError(f"--format aoti: the {meta['embeddings']} model at {meta['precision']} does not "
                             f"export ({type(exc).__name__}: {str(exc).strip()[:500]})") from exc


def _metadata(model: InferenceModel) -> Dict[str, Any]:
    keep = {k: v for k, v in model.metadata.items() if k not in ("format", "version")}
    return {"format": FORMAT, "version": VERSION, **keep}


def _refuses_bounds_check(program: torch.export.ExportedProgram) -> None:
    for node in program.graph.nodes:
        if node.op == "call_function" and "bounds_check_indices" in str(node.target):
            raise ValueError("--format aoti: the program calls fbgemm::bounds_check_indices, which AOTInductor does "
                             "not compile; compile the eager artifact (compile_package(load('model.pt'), ...)), "
                             "which traces it with the check in torch ops")


#: precisions whose tables AOTInductor cannot compile with this torch / torchrec, and why (checked by the tests)
UNCOMPILABLE: Dict[str, str] = {
    "int4": "torchrec's packed 4-bit weight tensor (torchrec.tensor_types.UInt4Tensor, the quantized EBC's int4 "
            "tables) implements no aten.as_strided, which Inductor's lowering calls; export int8 or fp16 for "
            "AOTInductor, or int4 as a torch.export program (--format pt2)",
}


def compile_package(program_or_artifact: Union[InferenceModel, str, Path, torch.export.ExportedProgram],
                    out_path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compile an eager artifact (a loaded :class:`InferenceModel` or its path) or an ExportedProgram of the
    pt2 signature into an AOTInductor package at ``out_path`` (a name ending in ``.pt2``). For an
    ExportedProgram, ``metadata`` is the pt2 metadata to store (a program with fbgemm's bounds check is refused)."""
    from trainer.serve.artifact import load

    if isinstance(program_or_artifact, (str, Path)):
        program_or_artifact = load(program_or_artifact)
    if isinstance(program_or_artifact, torch.export.ExportedProgram):
        _refuses_bounds_check(program_or_artifact)
        exported = program_or_artifact
        meta = {**(metadata or {}), "format": FORMAT, "version": VERSION}
    else:
        precision = str(program_or_artifact.metadata["precision"])
        pt2.check_exportable(str(program_or_artifact.metadata["embeddings"]), precision)
        if precision in UNCOMPILABLE:
            raise ValueError(f"--format aoti: {precision} tables do not compile with AOTInductor: "
                             f"{UNCOMPILABLE[precision]}")
        exported = export_for_package(program_or_artifact)
        meta = _metadata(program_or_artifact)
    out = Path(out_path)
    if out.suffix != ".pt2":
        raise ValueError(f"--format aoti: the package name must end in .pt2, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.pt2")
    text = json.dumps(meta, default=str)
    try:
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": {METADATA_KEY: text}})
    except Exception as exc:  # an Inductor lowering or C++ build failure: name the model, keep the cause
        tmp.unlink(missing_ok=True)
        raise ValueError(f"--format aoti: the {meta.get('embeddings')} model at {meta.get('precision')} does not "
                         f"compile with AOTInductor ({type(exc).__name__}: {str(exc).strip()[:500]})") from exc
    with zipfile.ZipFile(tmp, "a") as archive:
        root = _root(archive)
        archive.writestr(f"{root}/{METADATA_FILE}", text)
    tmp.replace(out)
    logger.info("compiled the %s model (%s tables) with AOTInductor to %s", meta.get("embeddings"),
                meta.get("precision"), out)
    return {"path": str(out), "precision": meta.get("precision"), "file_bytes": out.stat().st_size}


def export_checkpoint_package(config: Any, out: Union[str, Path], checkpoint_dir: Any = None,
                              precision: str = "fp32") -> Dict[str, Any]:
    """``compactrec export --format aoti``: the checkpoint's eager artifact (``export_checkpoint``, written to a
    temporary file and loaded back) compiled as an AOTInductor package at ``out``."""
    import tempfile

    from trainer.serve.artifact import load
    from trainer.serve.export import export_checkpoint

    pt2.check_exportable(config.embeddings.kind, precision)
    with tempfile.TemporaryDirectory(prefix="compactrec-aoti-") as tmp:
        done = export_checkpoint(config, Path(tmp) / "model.pt", checkpoint_dir, precision=precision)
        written = compile_package(load(done["path"]), out)
    return {**done, **written}


def _root(archive: zipfile.ZipFile) -> str:
    """The package's top folder (``<name>/`` holding ``data/aotinductor/``)."""
    for name in archive.namelist():
        if "/data/aotinductor/" in name:
            return name.split("/data/aotinductor/", 1)[0]
    raise ArtifactError(f"{archive.filename}: not an AOTInductor package (no data/aotinductor/)")


def is_package(path: Union[str, Path]) -> bool:
    """Whether ``path`` is an AOTInductor package (a zip holding ``data/aotinductor/``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The package's CompactRec metadata, read from the zip without loading its library."""
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(f"{_root(archive)}/{METADATA_FILE}")
        metadata = json.loads(text)
    except (zipfile.BadZipFile, OSError, KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: an AOTInductor package without CompactRec metadata ({METADATA_FILE}; "
                            f"{type(exc).__name__}); write one with `compactrec export CONFIG --format aoti`") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path}: metadata format is not {FORMAT!r}; write one with "
                            "`compactrec export CONFIG --format aoti`")
    return metadata


class PackageModel(nn.Module):
    """A loaded package as ``(dense [B, 13], KJT of raw ids) -> logits [B]``, with the eager model's ``metadata``."""

    def __init__(self, runner: Any, metadata: Dict[str, Any]) -> None:
        super().__init__()
        self.runner = runner
        self.metadata = metadata
        self.feature_names: List[str] = list(metadata["feature_names"])

    def run(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The package on the program's own inputs (dense float32, values int64, lengths int32)."""
        return self.runner(dense.to(torch.float32).contiguous(), values.to(torch.int64).contiguous(),
                           lengths.to(torch.int32).contiguous())

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        values, lengths = pt2.program_inputs(sparse_features, self.feature_names)
        return self.run(dense_features, values, lengths)

    def train(self, mode: bool = True) -> "PackageModel":
        """A compiled package is always in inference mode."""
        if mode:
            raise NotImplementedError("an AOTInductor package is inference only; it has no training mode")
        return self


def load_package(path: Union[str, Path]) -> PackageModel:
    """The package at ``path`` (:func:`compile_package`) as a :class:`PackageModel`; CPU. Runs its library."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"package {str(path)!r} does not exist; write one with "
                                "`compactrec export CONFIG --format aoti --out model.pt2`")
    if not is_package(path):
        raise ArtifactError(f"{path}: not an AOTInductor package; write one with `compactrec export CONFIG "
                            "--format aoti`")
    metadata = read_metadata(path)
    pt2.register_ops()
    import fbgemm_gpu  # noqa: F401 - the fbgemm operators the package calls

    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:  # a package of another torch build, a damaged library
        raise ArtifactError(f"{path}: the AOTInductor package does not load ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc
    return PackageModel(runner, metadata)


def operator_libraries() -> List[str]:
    """The shared libraries a C++ process dlopens before loading a package: fbgemm_gpu's, in the order ``import
    fbgemm_gpu`` loads them, then CompactRec's operator library (the C++ kernels; where they could not be built,
    only the Python fallback kernels exist and C++ cannot run the package)."""
    import fbgemm_gpu

    pt2.register_ops()
    loaded = [str(p) for p in torch.ops.loaded_libraries]
    order = {f"{name}.so": i for i, name in enumerate(getattr(fbgemm_gpu, "fbgemm_gpu_libraries", []))}
    fbgemm = sorted((p for p in loaded if Path(p).name in order), key=lambda p: order[Path(p).name])
    ours = [p for p in loaded if Path(p).name.startswith("compactrec_ops")]
    if not ours:
        raise RuntimeError("CompactRec's C++ operator library is not loaded (embeddings.ops.library could not build "
                           "it, or COMPACTREC_NATIVE=0): a C++ process has no compactrec::* kernels to run")
    return fbgemm + ours


__all__ = ["BAD_ID", "BAD_LENGTHS", "CheckedTBE", "FORMAT", "PackageModel", "checked_lookups", "compile_package",
           "export_checkpoint_package", "export_for_package", "is_package", "load_package", "operator_libraries",
           "read_metadata"]
