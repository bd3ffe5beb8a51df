"""``compactrec export --format aoti``: the inference model compiled with AOTInductor scores like the eager
artifact from Python and from a C++ program (``tests/trainer/cpp/aoti_score.cpp``), for ``full``, ``hash``,
``robe`` (a chunked method), ``lma`` and ``memrec`` at fp32 and int8, ``qr`` at fp32 and ``hash`` at fp16: every
method and every precision that compiles at least once (int4 does not compile: a clear error before compiling;
MEM-REC per sample / hot rows are not compiled here: each compile takes ~13 s on two cores); a row outside its table (fbgemm's own
bounds check is off in packages) and bad lengths are errors with no output; the CLI writes a package and
``compactrec score`` reads it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.trainer.test_export_pt2 import SHAPES, _artifacts, memrec_run  # noqa: F401 - the fixture
from tests.trainer.test_inference import _export, _score, Trained
from trainer.commands.cli import main
from trainer.serve import aoti, pt2
from trainer.serve.artifact import ArtifactError, load

REPO = Path(__file__).resolve().parents[2]
CASES = [(m, p) for m in ("full", "hash", "robe", "lma", "memrec") for p in ("fp32", "int8")] + [
    ("qr", "fp32"), ("hash", "fp16")]  # every method and every precision that compiles at least once
Inputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Packages:
    """Each method's artifacts (every precision) and packages, built once per module."""

    def __init__(self, tiny_dataset: Path, root: Path) -> None:
        self.tiny_dataset, self.root = tiny_dataset, root
        self.artifacts: Dict[str, Dict[str, Path]] = {}
        self.packages: Dict[Tuple[str, str], Path] = {}

    def artifact(self, name: str, precision: str) -> Path:
        if name not in self.artifacts:
            (self.root / name).mkdir()
            self.artifacts[name] = _artifacts(name, self.tiny_dataset, self.root / name)
        return self.artifacts[name][precision]

    def package(self, name: str, precision: str) -> Path:
        if (name, precision) not in self.packages:
            out = self.root / name / f"{precision}.pt2"
            assert aoti.compile_package(load(self.artifact(name, precision)), out)["path"] == str(out)
            self.packages[name, precision] = out
        return self.packages[name, precision]


@pytest.fixture(scope="module")
def packages(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return Packages(tiny_dataset, tmp_path_factory.mktemp("aoti"))


def _inputs(names: List[str]) -> List[Inputs]:
    return [pt2.example_inputs(len(names), 13, batch, bag, seed=batch + bag) for batch, bag in SHAPES]


def _eager(artifact: Path, inputs: List[Inputs]) -> List[torch.Tensor]:
    eager = load(artifact)  # a model that was never traced
    names = eager.metadata["feature_names"]
    with torch.no_grad():
        return [eager(d, KeyedJaggedTensor(keys=names, values=v, lengths=n, stride=d.shape[0])) for d, v, n in inputs]


@pytest.mark.parametrize("name,precision", CASES)
def test_the_package_scores_like_the_eager_artifact(name: str, precision: str, packages: Packages) -> None:
    model = aoti.load_package(packages.package(name, precision))
    assert model.metadata["format"] == aoti.FORMAT and model.metadata["precision"] == precision
    assert model.metadata["embeddings"] == name and aoti.is_package(packages.package(name, precision))
    inputs = _inputs(model.feature_names)
    want = _eager(packages.artifact(name, precision), inputs)
    for (batch, bag), (d, v, n), w in zip(SHAPES, inputs, want):
        got = model.run(d, v, n)
        assert got.shape == (batch,)
        # the pt2 tolerance: equal but for float summation order (the compiled MLPs)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6, msg=f"{name} {precision} B={batch} bag<={bag}")
    d, v, n = inputs[3]  # by feature name, like the eager model: a KJT in another key order
    kjt = KeyedJaggedTensor(keys=model.feature_names, values=v, lengths=n, stride=d.shape[0])
    order = list(reversed(range(len(model.feature_names))))
    torch.testing.assert_close(model(d, kjt.permute(order)), want[3], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def aoti_score(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``tests/trainer/cpp/aoti_score.cpp`` built against the installed torch (torch.utils.cpp_extension)."""
    from torch.utils import cpp_extension

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) on PATH: the C++ loader cannot be built")
    build = tmp_path_factory.mktemp("aoti_score")
    # --no-as-needed: keep libtorch.so loaded, fbgemm_gpu's libraries name it and are dlopened later
    exe = cpp_extension.load(name="aoti_score", sources=[str(REPO / "tests/trainer/cpp/aoti_score.cpp")],
                             extra_cflags=["-O1"], extra_ldflags=["-ldl", "-Wl,--no-as-needed"],
                             build_directory=str(build), is_python_module=False, is_standalone=True)
    yield Path(exe)


def _run_cpp(exe: Path, package: Path, inputs: Inputs, folder: Path) -> subprocess.CompletedProcess:
    d, v, n = inputs
    folder.mkdir()
    d.numpy().astype(np.float32).tofile(folder / "dense.f32")
    v.numpy().astype(np.int64).tofile(folder / "values.i64")
    n.numpy().astype(np.int32).tofile(folder / "lengths.i32")
    return subprocess.run([str(exe), str(package), str(folder), str(d.shape[0]), *aoti.operator_libraries()],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,precision", [("robe", "fp32"), ("hash", "int8")])
def test_the_cpp_program_scores_like_python(name: str, precision: str, packages: Packages, aoti_score: Path,
                                            tmp_path: Path) -> None:
    package = packages.package(name, precision)
    names = aoti.read_metadata(package)["feature_names"]
    inputs = _inputs(names)
    want = _eager(packages.artifact(name, precision), inputs)
    for i in (0, 3, 4):
        done = _run_cpp(aoti_score, package, inputs[i], tmp_path / str(i))
        assert done.returncode == 0, done.stderr[-3000:]
        got = torch.from_numpy(np.fromfile(tmp_path / str(i) / "logits.f32", dtype=np.float32))
        assert got.shape == (inputs[i][0].shape[0],)
        torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-6, msg=f"C++ {name} {precision} case {i}")


def test_a_row_outside_its_table_and_bad_lengths_are_errors_with_no_output(packages: Packages, aoti_score: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # raw ids never leave the tables (full reduces id mod rows): damage the id maths so that they do, feature 0
    # reaching past its table, feature 1 below row 0, as a corrupt package or a wrong method would
    eager = load(packages.artifact("full", "fp32"))
    from embeddings.quant import ReducedIdsEmbeddingBagCollection

    [reduced] = [m for m in eager.modules() if isinstance(m, ReducedIdsEmbeddingBagCollection)]
    modulus = reduced.get_buffer("rows")
    rows = modulus.clone()
    modulus[0], modulus[1] = 2 * rows[0], -rows[1]
    example = pt2.example_inputs

    def zero_ids(*args: int, **kwargs: int) -> Inputs:  # the traced ids: 0, inside the damaged tables too
        d, v, n = example(*args, **kwargs)
        return d, torch.zeros_like(v), n

    monkeypatch.setattr(pt2, "example_inputs", zero_ids)  # the check runs before tracing too (eager warm-up call)
    package = tmp_path / "damaged.pt2"
    aoti.compile_package(eager, package)
    monkeypatch.undo()
    model = aoti.load_package(package)
    d, v, n = pt2.example_inputs(26, 13, batch=3, bag=2, seed=5)
    n[:6] = 1  # one id per sample in features 0 and 1
    good = v.clone()
    good[:3], good[3:6] = torch.tensor([0, 5, int(rows[0]) - 1]), 0  # inside both tables
    with torch.no_grad():
        want = eager(d, KeyedJaggedTensor(keys=model.feature_names, values=good, lengths=n, stride=3))
    torch.testing.assert_close(model.run(d, good, n), want, rtol=1e-5, atol=1e-6)
    past, below = good.clone(), good.clone()
    past[1] = int(rows[0]) + 1   # row rows[0] + 1 of feature 0's table
    below[4] = 1                 # 1 mod -rows[1]: a negative row
    for bad in (past, below):
        with pytest.raises(RuntimeError, match=r"outside \[0, rows\) of its feature's table"):
            model.run(d, bad, n)
    negative, short = n.clone(), n.clone()
    negative[0] = -1
    short[7] += 1  # lengths sum to N + 1
    for lengths in (negative, short):
        with pytest.raises(RuntimeError, match="lengths must be >= 0 and sum to the number of values"):
            model.run(d, good, lengths)
    # the C++ program: the same error, exit status 1, no logits file
    done = _run_cpp(aoti_score, package, (d, past, n), tmp_path / "cpp")
    assert done.returncode == 1 and "outside [0, rows) of its feature's table" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "cpp" / "logits.f32").exists()


def test_cli_exports_a_checkpoint_as_a_package_and_score_reads_it(memrec_run: Trained, tmp_path: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture) -> None:
    preset, overrides, val, _ = memrec_run
    eager = _export(preset, overrides, tmp_path / "model.pt", "int8")
    package = tmp_path / "model.pt2"
    assert main(["export", str(REPO / "configs" / preset), *overrides, "--format", "aoti", "--out", str(package),
                 "--precision", "int8"]) == 0
    assert "as an AOTInductor package: int8 tables" in capsys.readouterr().out
    assert aoti.is_package(package) and not aoti.is_package(eager)
    a = _score(eager, predictions=str(tmp_path / "eager.npy"))
    b = _score(package, predictions=str(tmp_path / "aoti.npy"), batch_size=333)  # other batch sizes than traced
    np.testing.assert_allclose(np.load(tmp_path / "aoti.npy"), np.load(tmp_path / "eager.npy"), rtol=1e-5, atol=1e-6)
    assert b["rows"] == a["rows"] == 2500 and abs(b["auc"] - a["auc"]) < 1e-9
    assert main(["score", str(package), "--no-progress"]) == 0
    assert "int8 tables" in capsys.readouterr().out


def test_load_package_refuses_other_files(tmp_path: Path, packages: Packages) -> None:
    with pytest.raises(FileNotFoundError, match="--format aoti"):
        aoti.load_package(tmp_path / "missing.pt2")
    other = tmp_path / "other.pt2"
    other.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not an AOTInductor package"):
        aoti.load_package(other)
    with pytest.raises(ArtifactError, match="not an AOTInductor package"):
        aoti.load_package(packages.artifact("full", "fp32"))  # an eager artifact
    import zipfile

    stripped = tmp_path / "stripped.pt2"
    with zipfile.ZipFile(packages.package("full", "fp32")) as src, zipfile.ZipFile(stripped, "w") as dst:
        for item in src.namelist():
            if not item.endswith(aoti.METADATA_FILE):
                dst.writestr(item, src.read(item))
    with pytest.raises(ArtifactError, match="without CompactRec metadata"):
        aoti.load_package(stripped)


def test_a_pt2_program_with_fbgemms_bounds_check_is_refused_before_compiling(packages: Packages,
                                                                             tmp_path: Path) -> None:
    program = tmp_path / "full.pt2"
    pt2.export_program(load(packages.artifact("full", "fp32")), program)
    pt2.register_ops()
    with pytest.raises(ValueError, match="calls fbgemm::bounds_check_indices, which AOTInductor does not compile"):
        aoti.compile_package(torch.export.load(program), tmp_path / "package.pt2")
    assert not (tmp_path / "package.pt2").exists()


def test_int4_tables_are_refused_before_compiling_naming_the_cause(packages: Packages, tmp_path: Path) -> None:
    """int4 does not compile (``aoti.UNCOMPILABLE``: torchrec's UInt4Tensor has no ``aten.as_strided``): refused
    with the cause and the alternatives, before any compile, and no package is written."""
    with pytest.raises(ValueError, match="int4 tables do not compile with AOTInductor.*as_strided.*--format pt2"):
        aoti.compile_package(packages.artifact("robe", "int4"), tmp_path / "int4.pt2")
    assert not list(tmp_path.glob("*.pt2"))
