"""``compactrec export --format pt2``: every method's inference model at every precision as a torch.export
program that loads with ``torch.export.load`` in a fresh process holding only torch, torchrec, fbgemm_gpu and
CompactRec's operator modules, and scores equal to the eager artifact for batch sizes and bag lengths other than
the traced ones; the CLI writes it from a checkpoint and ``compactrec score`` reads it; what does not export is an
error naming the method and the precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import memrec_rows, tiny_overrides
from tests.trainer.test_inference import _export, _score, _trained, Trained
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.serve import pt2
from trainer.serve.artifact import ArtifactError, InferenceModel, load

REPO = Path(__file__).resolve().parents[2]
PRECISIONS = ("fp32", "fp16", "int8", "int4")
METHODS = {  # the smallest configs of every method (test_inference.ROUND_TRIP); prepared: id counts / LMA index
    "full": ("default.yaml", [], False),
    "hash": ("hash_small.yaml", [], True),
    "robe": ("robe_small.yaml", [], True),
    "qr": ("qr_small.yaml", ["embeddings.options.hot_share=0"], True),
    "lma": ("lma_small.yaml", ["embeddings.options.sample_rows=4000"], True),
    "memrec": ("memrec_small.yaml", memrec_rows(500), False),
    "memrec_per_sample": ("memrec_small.yaml", ["embeddings.options.granularity=per_sample", *memrec_rows(500)],
                          False),
    "memrec_hot_rows": ("memrec_small.yaml", ["embeddings.options.budget=0.05", "embeddings.options.hot_share=0.5",
                                              "embeddings.table_sizes=counts"], True),
}
# (batch, most ids per bag): the traced shape is pt2.example_inputs' (4, 2); batch 1 and empty bags included
SHAPES = [(4, 2), (1, 0), (1, 3), (7, 5), (64, 1)]

METHOD_MODULES = {"embeddings.quant", "embeddings.registry", "embeddings.remap", "embeddings.full", "embeddings.lma",
                  "embeddings.robe", "embeddings.qr", "embeddings.hashing_trick", "embeddings.memrec",
                  "embeddings.chunk_table", "embeddings.inference_state", "embeddings.types"}
# the fresh process: no trainer, no method module, no config; only the operators registered
FRESH = """
import sys, torch, torchrec, fbgemm_gpu
from embeddings.ops import chunk_bag, salted_hash
salted_hash.ensure_op(); chunk_bag.ensure_ops()
cases = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, (program, inputs) in cases.items():
    module = torch.export.load(program).module()
    with torch.no_grad():
        out[name] = [module(*args) for args in inputs]
torch.save(out, sys.argv[2])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "embeddings", "sharding"))
print("MODULES " + " ".join(loaded))
"""


def _in_fresh_process(cases: Dict[str, Tuple[str, List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]], tmp: Path) -> Tuple[Dict[str, Any], List[str]]:
    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp / "cases.pt"), str(tmp / "out.pt")], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = done.stdout.split("MODULES", 1)[1].split()
    return torch.load(tmp / "out.pt", weights_only=True), modules


def _artifacts(name: str, tiny_dataset: Path, tmp: Path) -> Dict[str, Path]:
    from trainer.prepare.dataset_info import dataset_info
    from trainer.prepare.run import prepare
    from trainer.serve.export import build_unsharded, write_artifact

    preset, extra, prepared = METHODS[name]
    config = load_config(REPO / "configs" / preset, tiny_overrides(tiny_dataset, tmp / "run") + extra +
                         [f"data.counts_path={tmp / 'counts.npz'}"] +
                         ([f"embeddings.options.index_path={tmp / 'index.npz'}"] if name == "lma" else []))
    if prepared:
        prepare(config)
    info = dataset_info(config)
    torch.manual_seed(0)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                                  info.id_counts)
    out = {}
    for precision in PRECISIONS:
        out[precision] = tmp / f"{precision}.pt"
        write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature, precision,
                       out[precision])
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_and_precision_exports_and_scores_like_the_eager_artifact(name: str, tiny_dataset: Path,
                                                                               tmp_path: Path) -> None:
    artifacts = _artifacts(name, tiny_dataset, tmp_path)
    cases: Dict[str, Tuple[str, List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {}
    want: Dict[str, List[torch.Tensor]] = {}
    for precision, artifact in artifacts.items():
        program = tmp_path / f"{precision}.pt2"
        assert pt2.export_program(load(artifact), program)["path"] == str(program)
        eager = load(artifact)  # a model that was never traced
        names = eager.metadata["feature_names"]
        inputs = [pt2.example_inputs(len(names), 13, batch, bag, seed=batch + bag) for batch, bag in SHAPES]
        with torch.no_grad():
            want[precision] = [eager(d, KeyedJaggedTensor(keys=names, values=v, lengths=n, stride=d.shape[0]))
                               for d, v, n in inputs]
        cases[precision] = (str(program), inputs)
    got, modules = _in_fresh_process(cases, tmp_path)
    # the operator modules and the few helpers they import; no trainer, sharding, method, registry or quant module
    assert not [m for m in modules if m.startswith(("trainer", "sharding")) or m in METHOD_MODULES], modules
    assert "embeddings.ops.chunk_bag" in modules
    for precision in PRECISIONS:
        for (batch, bag), g, w in zip(SHAPES, got[precision], want[precision]):
            assert g.shape == (batch,), (precision, batch, bag)
            # equal but for float summation order (bitwise at batch >= 2 here; batch 1 runs as 2 inside)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"{name} {precision} B={batch} bag<={bag}")
    # the program's own loader scores KJTs by feature name, like the eager model
    model = pt2.load_program(tmp_path / "int8.pt2")
    d, v, n = cases["int8"][1][3]
    kjt = KeyedJaggedTensor(keys=model.feature_names, values=v, lengths=n, stride=d.shape[0])
    assert model.metadata["precision"] == "int8" and model.metadata["format"] == pt2.FORMAT
    torch.testing.assert_close(model(d, kjt), want["int8"][3], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def memrec_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _trained("memrec_small.yaml", tiny_dataset, tmp_path_factory)


def test_cli_exports_a_checkpoint_as_pt2_and_score_reads_it(memrec_run: Trained, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    preset, overrides, val, _ = memrec_run
    eager = _export(preset, overrides, tmp_path / "model.pt", "int8")
    program = tmp_path / "model.pt2"
    assert main(["export", str(REPO / "configs" / preset), *overrides, "--format", "pt2", "--out", str(program),
                 "--precision", "int8"]) == 0
    assert "as a torch.export program: int8 tables" in capsys.readouterr().out
    assert pt2.is_program(program) and not pt2.is_program(eager)
    a = _score(eager, predictions=str(tmp_path / "eager.npy"))
    b = _score(program, predictions=str(tmp_path / "pt2.npy"), batch_size=333)  # other batch sizes than traced
    import numpy as np

    np.testing.assert_allclose(np.load(tmp_path / "pt2.npy"), np.load(tmp_path / "eager.npy"), rtol=1e-5, atol=1e-6)
    assert b["rows"] == a["rows"] == 2500 and abs(b["auc"] - a["auc"]) < 1e-9
    assert abs(a["auc"] - val["auc"]) < 1e-3
    assert main(["score", str(program), "--no-progress"]) == 0
    assert "int8 tables" in capsys.readouterr().out


def test_a_method_that_does_not_export_is_a_clear_error(memrec_run: Trained, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    preset, overrides, _, _ = memrec_run
    monkeypatch.setitem(pt2.UNSUPPORTED, ("memrec", "int4"), "fbgemm op X has no fake kernel")
    out = tmp_path / "model.pt2"
    assert main(["export", str(REPO / "configs" / preset), *overrides, "--format", "pt2", "--out", str(out),
                 "--precision", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--format pt2: the memrec model at int4 does not export with torch" in err
    assert "fbgemm op X has no fake kernel" in err and not out.exists()


class _DataDependent(torch.nn.Module):
    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if int(kjt.values().sum()) > 0:  # Python control flow on a tensor value: what torch.export cannot trace
            return dense.sum(1, keepdim=True)
        return dense.mean(1, keepdim=True)


def test_a_tracing_failure_names_the_method_and_precision(tmp_path: Path) -> None:
    names = [f"cat_{i}" for i in range(26)]
    model = InferenceModel(_DataDependent(), {"feature_names": names, "embeddings": "mine", "precision": "fp16",
                                              "config": {}})
    with pytest.raises(ValueError, match=r"--format pt2: the mine model at fp16 does not export \("):
        pt2.export_program(model, tmp_path / "x.pt2")
    assert not (tmp_path / "x.pt2").exists()


def test_load_program_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--format pt2"):
        pt2.load_program(tmp_path / "missing.pt2")
    other = tmp_path / "other.pt2"
    other.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable torch.export program"):
        pt2.load_program(other)

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    bare = tmp_path / "bare.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.ones(2),)), bare)
    with pytest.raises(ArtifactError, match="without CompactRec metadata"):
        pt2.load_program(bare)


class _MakesDirectory:
    """Unpickling it creates a directory: what a crafted archive could do to ``torch.export.load``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.target),))


def _rewritten(source: Path, out: Path, name_part: str, data: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, data if name_part in item else src.read(item))
    return out


def test_a_program_whose_loading_would_unpickle_objects_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    import io

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale  # type: ignore[operator]

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(Plain(), (torch.ones(2),)), good)
    pt2.check_archive(good)  # raw tensors only
    target = tmp_path / "created"
    buffer = io.BytesIO()
    torch.save(_MakesDirectory(target), buffer)
    crafted = _rewritten(good, tmp_path / "crafted.pt2", "/data/sample_inputs/", buffer.getvalue())
    with pytest.raises(ArtifactError, match="crafted.pt2: refused: the program's sample inputs .* nothing in the file"):
        pt2.load_program(crafted)
    assert not target.exists()
    config = {"config": {"scale": {"path_name": "weight_0", "is_param": True, "use_pickle": True}}}
    pickled = _rewritten(good, tmp_path / "pickled.pt2", "model_weights_config.json", json.dumps(config).encode())
    with pytest.raises(ArtifactError, match="refused: the program's entry 'scale' .weight_0. would be unpickled"):
        pt2.load_program(pickled)
