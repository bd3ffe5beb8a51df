"""Inference artifacts end to end: train -> ``compactrec export --precision`` -> ``trainer.serve.artifact.load`` ->
``compactrec score`` equals the training model's own evaluation (fp32 within float tolerance, fp16/int8 AUC within
0.001); ``score`` reads TSV, npy and npz alike; the Python API; every method's model survives the round trip with
no config, index or process group, from a file that reads with ``torch.load(weights_only=True)``; wrong, corrupt,
other-version and wrong-precision artifacts are clear errors (crafted pickles: ``test_artifact_safety.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import memrec_rows, tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.serve.artifact import ArtifactError, load, read_artifact
from trainer.serve.export import VERSION, tensor_checksums
from trainer.serve.score import run_score

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["training.evals_per_epoch=1", "training.final_test=false", "training.checkpoint_every=1000",
         "data.limit_train_batches=24"]
PRESETS = {  # preset -> (extra overrides, ranks): full row-wise over 2 ranks, MEM-REC in one
    "default.yaml": (["sharding.default_sharding_types=[row_wise]"], 2),
    "memrec_small.yaml": (memrec_rows(2000, 2000), 1),
}


def _train(rank: int, world_size: int, preset: str, overrides: List[str]) -> Dict[str, Any]:
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    return run_training(load_config(REPO / "configs" / preset, overrides), init_distributed("cpu"))


Trained = Tuple[str, List[str], Dict[str, Any], Path]


def _trained(preset: str, tiny_dataset: Path, factory: pytest.TempPathFactory) -> Trained:
    extra, ranks = PRESETS[preset]
    run = factory.mktemp("run")
    overrides = tiny_overrides(tiny_dataset, run) + TRAIN + extra
    result = run_multiprocess(_train, ranks, args=(preset, overrides))[0]
    return preset, overrides, result["val"], run


@pytest.fixture(scope="module")
def full_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _trained("default.yaml", tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def memrec_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _trained("memrec_small.yaml", tiny_dataset, tmp_path_factory)


@pytest.fixture(params=["full_run", "memrec_run"])
def trained(request: pytest.FixtureRequest) -> Trained:
    return request.getfixturevalue(request.param)


def _export(preset: str, overrides: List[str], out: Path, precision: str) -> Path:
    assert main(["export", str(REPO / "configs" / preset), *overrides, "--out", str(out), "--precision", precision]) == 0
    return out


def _score(artifact: Path, *overrides: str, **kw: Any) -> Dict[str, Any]:
    args: Dict[str, Any] = dict(data=None, fmt=None, split="val", batch_size=None, threads=None, progress=False,
                                predictions=None)
    args.update(kw)
    return run_score(str(artifact), args["data"], args["fmt"], args["split"], args["batch_size"], list(overrides),
                     args["threads"], args["progress"], args["predictions"])


def test_export_load_score_equals_the_training_evaluation(trained: Trained, tmp_path: Path) -> None:
    preset, overrides, val, run = trained
    for precision in ("fp32", "fp16", "int8"):
        artifact = _export(preset, overrides, tmp_path / f"model-{precision}.pt", precision)
        meta = read_artifact(artifact)
        assert (meta["precision"], meta["version"], meta["ids"]) == (precision, VERSION, "raw")
        assert meta["checkpoint"]["step"] == 24
        got = _score(artifact)
        assert got["rows"] == got["labelled_rows"] == val["samples"] == 2500
        if precision == "fp32":  # the same model: float summation order only
            assert abs(got["auc"] - val["auc"]) < 1e-6 and got["logloss"] == pytest.approx(val["logloss"], rel=1e-5)
        else:
            assert abs(got["auc"] - val["auc"]) < 1e-3, (precision, got["auc"], val["auc"])
        assert got["oracle_auc"] == pytest.approx(val["oracle_auc"], abs=1e-9)


def _mirror(source: Path, out: Path, day: int) -> Path:
    """``day`` of ``source`` in all three formats with the same rows and ids: the npy files, a TSV whose dense
    fields are the raw integers of the source TSV and whose categorical fields are the npy ids in hex, and an
    MLPerf-style npz holding the npy ids as one-hot bags."""
    out.mkdir()
    sparse = np.load(source / f"day_{day}_sparse.npy")
    for name in [f"day_{day}_{kind}.npy" for kind in ("dense", "sparse", "labels", "oracle_logits")] + ["manifest.json"]:
        (out / name).write_bytes((source / name).read_bytes())
    lines = (source / f"day_{day}").read_text().splitlines()
    assert len(lines) == sparse.shape[0]
    with open(out / f"day_{day}", "w") as f:
        for line, ids in zip(lines, sparse):
            fields = line.split("\t")
            f.write("\t".join(fields[:14] + [format(int(x), "08x") for x in ids]) + "\n")
    with open(out / f"day_{day}_sparse_multi_hot.npz", "wb") as f:
        np.savez(f, **{str(i): sparse[:, i:i + 1].astype(np.int32) for i in range(sparse.shape[1])})
    return out


def test_score_reads_tsv_npy_and_npz_alike(memrec_run: Trained, tiny_dataset: Path, tmp_path: Path) -> None:
    preset, overrides, val, _ = memrec_run
    artifact = _export(preset, overrides, tmp_path / "model.pt", "int8")
    mirror = _mirror(tiny_dataset, tmp_path / "mirror", day=3)
    results = {}
    for fmt in ("npy", "tsv", "npz"):
        extra = ["data.multi_hot_sizes=[" + ", ".join(["1"] * 26) + "]"] if fmt == "npz" else []
        results[fmt] = _score(artifact, *extra, data=str(mirror), fmt=fmt, split="day", batch_size=700,
                              predictions=str(tmp_path / f"{fmt}.npy"))
    logits = {fmt: np.load(tmp_path / f"{fmt}.npy") for fmt in results}
    assert logits["npy"].shape == (5000,) and results["npy"]["rows"] == 5000
    for fmt in ("tsv", "npz"):
        assert np.array_equal(logits[fmt], logits["npy"]), fmt
        assert results[fmt]["auc"] == results["npy"]["auc"] and results[fmt]["logloss"] == results["npy"]["logloss"]
    # the val half of the mirrored day is the val split the model was evaluated on in training
    half = _score(artifact, data=str(mirror), fmt="tsv")
    assert abs(half["auc"] - val["auc"]) < 1e-3 and half["rows"] == 2500


def test_score_command_prints_metrics_and_throughput(full_run: Trained, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    preset, overrides, val, _ = full_run
    artifact = _export(preset, overrides, tmp_path / "model.pt", "fp16")
    assert main(["score", str(artifact), "--threads", "1", "--no-progress", "data.eval_batch_size=333"]) == 0
    out = capsys.readouterr().out
    assert "fp16 tables" in out and "samples/s" in out and "2,500 rows" in out and "1 thread(s)" in out
    auc = float(out.split("AUC ")[1].split()[0])
    assert abs(auc - val["auc"]) < 1e-3


def test_python_api_takes_raw_ids_by_feature_name(trained: Trained, tmp_path: Path) -> None:
    from trainer.data import loader

    preset, overrides, _, _ = trained
    model = load(_export(preset, overrides, tmp_path / "model.pt", "int8"))
    assert model.metadata["precision"] == "int8" and len(model.metadata["feature_names"]) == 26
    config = load_config(REPO / "configs" / preset, overrides)
    batch = next(iter(loader.make_batches(config.data, "val", 0, 1)))
    kjt = batch.sparse_features
    with torch.no_grad():
        logits = model(batch.dense_features, kjt)
        # the same ids under another key order, an unused extra key, and ids shifted by whole table sizes
        keys = list(reversed(kjt.keys()))
        parts = kjt.to_dict()
        sizes = dict(zip(model.metadata["feature_names"], model.metadata["num_embeddings_per_feature"]))
        shift = {k: sizes[k] if preset == "default.yaml" else 0 for k in keys}
        values = torch.cat([parts[k].values() + shift[k] for k in keys] + [torch.arange(kjt.stride())])
        lengths = torch.cat([parts[k].lengths() for k in keys] + [torch.ones(kjt.stride(), dtype=torch.int32)])
        other = KeyedJaggedTensor.from_lengths_sync(keys=keys + ["unused"], values=values, lengths=lengths)
        assert logits.shape == (kjt.stride(),)
        assert torch.equal(model(batch.dense_features, other), logits)


# ---- every method's model, no training: the artifact holds everything it needs ----------------------------
ROUND_TRIP = {
    "dlrm_dcn_full": ("default.yaml", ["model.arch=dlrm_dcn", "embeddings.options.pooling=mean"]),
    "memrec_per_sample": ("memrec_small.yaml", ["embeddings.options.granularity=per_sample", *memrec_rows(500)]),
    "robe": ("robe_small.yaml", []),
    "hash": ("hash_small.yaml", []),
    "qr": ("qr_small.yaml", ["embeddings.options.hot_share=0"]),  # the tiny log's 1/10 holds QR's floor only
    "lma": ("lma_small.yaml", ["embeddings.options.sample_rows=4000"]),
    # data-derived rows: hot rows (the most frequent ids' own rows) and full's vocabulary, from the id counts
    "memrec_hot_rows": ("memrec_small.yaml", ["embeddings.options.budget=0.05", "embeddings.options.hot_share=0.5",
                                              "embeddings.table_sizes=counts"]),
    "full_vocabulary": ("default.yaml", ["embeddings.options.ids=vocabulary"]),
}
# need `compactrec prepare` (LMA index, id counts for hot rows and table sizes)
PREPARED = {"lma", "memrec_hot_rows", "full_vocabulary", "robe", "hash", "qr"}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_every_method_round_trips_without_config_or_index(name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    from trainer.data import loader
    from trainer.prepare.dataset_info import dataset_info
    from trainer.serve.export import build_unsharded, write_artifact
    from trainer.train.ids import reduce_ids
    from trainer.prepare.run import prepare

    preset, extra = ROUND_TRIP[name]
    index = tmp_path / "lma_index.npz"
    counts = tmp_path / "counts.npz"
    config = load_config(REPO / "configs" / preset, tiny_overrides(tiny_dataset, tmp_path / "run") + extra +
                         [f"data.counts_path={counts}"] +
                         ([f"embeddings.options.index_path={index}"] if name == "lma" else []))
    if name in PREPARED:
        prepare(config)
    info = dataset_info(config)
    torch.manual_seed(0)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                                  info.id_counts)
    model.eval()
    batch = next(iter(loader.make_batches(config.data, "val", 0, 1)))
    sparse = batch.sparse_features
    if arch.ids == "table":
        sparse = reduce_ids(sparse, torch.tensor(info.num_embeddings_per_feature))
    with torch.no_grad():
        want = model(batch.dense_features, sparse).squeeze(-1)
    buffers = {n for n, _ in arch.module.named_buffers()}
    assert name != "memrec_hot_rows" or any("hot" in n for n in buffers), buffers  # the case tests what it says
    for precision in ("fp32", "int8"):
        write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature, precision,
                       tmp_path / f"{precision}.pt")
        assert "layout" not in torch.load(tmp_path / f"{precision}.pt", weights_only=True)["sparse"]  # data only
    index.unlink(missing_ok=True)  # LMA's dictionary, the hot-row keys and the vocabulary are in the artifact
    counts.unlink(missing_ok=True)
    with torch.no_grad():
        got = load(tmp_path / "fp32.pt")(batch.dense_features, batch.sparse_features)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        coarse = load(tmp_path / "int8.pt")(batch.dense_features, batch.sparse_features)
    assert 0 < float((coarse - want).abs().max()) < 0.05


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.prepare.dataset_info import dataset_info
    from trainer.serve.export import build_unsharded, write_artifact

    tmp = tmp_path_factory.mktemp("artifact")
    config = load_config(REPO / "configs" / "hash_small.yaml", tiny_overrides(tiny_dataset, tmp / "run") + [
        "embeddings.options.hot_share=0", "embeddings.table_sizes=auto"])  # no id counts needed
    info = dataset_info(config)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"))
    write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature, "int8",
                   tmp / "model.pt")
    return tmp / "model.pt"


def _edited(artifact: Path, out: Path, edit: Any, checksums: bool = True) -> Path:
    """``artifact`` edited by ``edit``; with ``checksums`` its sha256 entry is rewritten to match the edit."""
    payload = torch.load(artifact, weights_only=True)  # data only
    edit(payload)
    if checksums:
        payload["sha256"] = tensor_checksums(payload)
    torch.save(payload, out)
    return out


def test_a_damaged_tensor_is_an_error_naming_the_file(artifact: Path, tmp_path: Path) -> None:
    def flip(p: Dict[str, Any]) -> None:
        weight = p["sparse"]["tables"]["hash_cat_1"]["weight"]
        weight.view(-1)[weight.numel() // 2] ^= 0xFF

    damaged = _edited(artifact, tmp_path / "damaged.pt", flip, checksums=False)
    with pytest.raises(ArtifactError, match=r"damaged.pt: inference artifact is damaged: tensor\(s\) "
                                            r"\['sparse.tables.hash_cat_1.weight'\] differ .*export the checkpoint again"):
        load(damaged)
    assert main(["score", str(damaged), "--no-progress"]) == 2
    load(artifact)  # the original is intact


def test_wrong_corrupt_and_other_version_artifacts_are_clear_errors(artifact: Path, tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=f"{cut}: not a readable CompactRec inference artifact"):
        load(cut)
    with pytest.raises(ArtifactError, match="manifest.json: not a readable CompactRec inference artifact"):
        load(tiny_dataset / "manifest.json")
    other = tmp_path / "state.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ArtifactError, match=f"{other}: not a CompactRec inference artifact .no format"):
        load(other)
    old = _edited(artifact, tmp_path / "v1.pt", lambda p: p.update(version=1))
    with pytest.raises(ArtifactError, match=f"format version 1, this code reads version {VERSION}; export the checkpoint again"):
        load(old)
    with pytest.raises(ArtifactError, match="lacks \\['dense_state_dict'\\]"):
        load(_edited(artifact, tmp_path / "cut-entry.pt", lambda p: p.pop("dense_state_dict")))
    with pytest.raises(ArtifactError, match="table hash_cat_1: int8 rows must be uint8"):
        load(_edited(artifact, tmp_path / "rows.pt",
                     lambda p: p["sparse"]["tables"]["hash_cat_1"].update(weight=torch.zeros(3, 16, dtype=torch.uint8))))
    with pytest.raises(FileNotFoundError, match="does not exist; write one with `compactrec export"):
        load(tmp_path / "missing.pt")
    assert main(["score", str(old), "--no-progress"]) == 2  # the CLI reports it, no traceback


def test_a_precision_the_kernel_lacks_is_a_clear_error(artifact: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ArtifactError, match="table precision 'int2' is not one fbgemm's inference TBE runs"):
        load(_edited(artifact, tmp_path / "int2.pt", lambda p: p.update(precision="int2")))
    config = str(REPO / "configs" / "default.yaml")
    assert main(["export", config, "--out", str(tmp_path / "x.pt"), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--precision 'bf16' is not a table precision of fbgemm's inference TBE here; choose one of fp32, fp16" in err
    assert not (tmp_path / "x.pt").exists()
