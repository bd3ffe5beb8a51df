"""An inference artifact is data only: it reads with ``torch.load(weights_only=True)``, its metadata is JSON, a file
carrying a pickled object is refused before anything in it runs (by ``trainer.serve.artifact.load`` and by
``compactrec score``), an artifact of the pickling format 3 is told to be exported again, the module is rebuilt
from the stored config and state in a directory holding nothing but the artifact, and a method without inference
hooks cannot be exported."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch

from embeddings import registry
from embeddings.inference_state import hooks_of
from tests.conftest import tiny_overrides
from tests.trainer.test_inference import REPO, ROUND_TRIP
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.serve.artifact import ArtifactError, load
from trainer.serve.export import FORMAT, VERSION, build_unsharded, tensor_checksums, write_artifact


class MakeDirectory:
    """Unpickling this creates ``path``: what a file that runs code when opened does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return os.mkdir, (self.path,)


def _crafted(out: Path, target: Path, version: int = VERSION) -> Path:
    """An artifact-looking file whose unpickling would create ``target``."""
    torch.save({"format": FORMAT, "version": version, "precision": "fp32", "sparse": {"form": "remapped"},
                "dense_state_dict": {"w": torch.zeros(2)}, "payload": MakeDirectory(str(target))}, out)
    return out


def test_a_file_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    control = tmp_path / "control"  # the crafted file is real: an unrestricted torch.load runs it
    torch.load(_crafted(tmp_path / "control.pt", control), weights_only=False)
    assert control.is_dir()

    target = tmp_path / "created-by-the-artifact"
    crafted = _crafted(tmp_path / "model.pt", target)
    with pytest.raises(ArtifactError, match=rf"{crafted}: refused: the file carries pickled objects \(posix\.mkdir\).*"
                                            "nothing in it was run"):
        load(crafted)
    assert not target.exists()
    assert main(["score", str(crafted), "--no-progress"]) == 2
    assert not target.exists()


def test_an_artifact_of_the_pickling_format_is_told_to_export_again(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "created-by-the-artifact"
    old = _crafted(tmp_path / "v3.pt", target, version=3)
    with pytest.raises(ArtifactError, match=r"v3.pt: inference artifact format version 3 holds pickled package "
                                            r"objects .*nothing in the file was run.*`compactrec export CONFIG --out "
                                            "ARTIFACT"):
        load(old)
    capsys.readouterr()
    assert main(["score", str(old), "--no-progress"]) == 2
    assert "compactrec export CONFIG --out ARTIFACT" in capsys.readouterr().err
    assert not target.exists()


def _plain(value: Any) -> Any:
    """``value`` with every tensor replaced by its dtype and shape (what is left must be JSON)."""
    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape)]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _export(name: str, dataset: Path, tmp_path: Path, precision: str = "fp32") -> Tuple[Path, Any, Any, Any]:
    """The ``ROUND_TRIP`` case ``name`` prepared on ``dataset`` and exported untrained: (artifact, config, model,
    a validation batch)."""
    from trainer.data import loader
    from trainer.prepare.dataset_info import dataset_info
    from trainer.prepare.run import prepare

    preset, extra = ROUND_TRIP[name]
    config = load_config(REPO / "configs" / preset, tiny_overrides(dataset, tmp_path / "run") + extra + [
        f"data.counts_path={tmp_path / 'counts.npz'}", f"embeddings.options.index_path={tmp_path / 'index.npz'}"]
        if name == "lma" else tiny_overrides(dataset, tmp_path / "run") + extra +
        [f"data.counts_path={tmp_path / 'counts.npz'}"])
    prepare(config)
    info = dataset_info(config)
    torch.manual_seed(0)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                                  info.id_counts)
    artifact = tmp_path / f"{name}.pt"
    write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature, precision, artifact)
    batch = next(iter(loader.make_batches(config.data, "val", 0, 1)))
    return artifact, config, model.eval(), batch


@pytest.mark.parametrize("name", ["lma", "memrec_hot_rows", "full_vocabulary"])
def test_an_artifact_alone_in_a_fresh_directory_loads(name: str, tiny_dataset: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    artifact, _, model, batch = _export(name, data, tmp_path / "work")
    payload = torch.load(artifact, weights_only=True)  # data only
    json.dumps(_plain(payload))  # and everything but the tensors is JSON
    assert "layout" not in payload["sparse"] and payload["sparse"]["state"]["hot_sizes"].sum() > 0
    if name == "lma":
        assert int(payload["sparse"]["state"]["lma_dictionary_entries"]) == payload["sparse"]["buffers"][
            "lma_index_keys"].numel() > 0
    with torch.no_grad():
        want = model(batch.dense_features, batch.sparse_features).squeeze(-1)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.move(str(artifact), fresh / "model.pt")
    shutil.rmtree(tmp_path / "work")  # the id counts, the LMA index, the run directory
    shutil.rmtree(data)  # and the data it was prepared from
    assert sorted(p.name for p in fresh.iterdir()) == ["model.pt"]
    monkeypatch.chdir(fresh)
    with torch.no_grad():
        got = load("model.pt")(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_stored_state_that_does_not_rebuild_the_tables_is_an_error(tiny_dataset: Path, tmp_path: Path) -> None:
    artifact, _, _, _ = _export("memrec_hot_rows", tiny_dataset, tmp_path)
    payload: Dict[str, Any] = torch.load(artifact, weights_only=True)
    state = payload["sparse"]["state"]
    keep = int(state["hot_sizes"][0]) - 1  # one hot value fewer: the budget then buys other tables
    state["hot_values"] = torch.cat([state["hot_values"][:keep], state["hot_values"][keep + 1:]])
    state["hot_sizes"][0] -= 1
    payload["sha256"] = tensor_checksums(payload)
    torch.save(payload, tmp_path / "edited.pt")
    # the rebuilt module's tables or its hot-row buffers differ from the stored ones
    total = int(state["hot_sizes"].sum())
    with pytest.raises(ArtifactError, match=rf"edited.pt: .*(tables|buffer 'hot_keys': this code's module has "
                                            rf"\(torch.int64, \[{total}\]\), the artifact \(torch.int64, "
                                            rf"\[{total + 1}\]\))"):
        load(tmp_path / "edited.pt")


def test_a_method_without_inference_hooks_cannot_be_exported(tiny_dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.prepare.dataset_info import dataset_info

    spec = registry.get("hash")
    monkeypatch.setitem(registry._REGISTRY, "hash", dataclasses.replace(spec, inference=None))
    with pytest.raises(ValueError, match="embeddings.kind 'hash' has no inference hooks.*InferenceHooks"):
        hooks_of(registry.get("hash"))
    config = load_config(REPO / "configs" / "hash_small.yaml", tiny_overrides(tiny_dataset, tmp_path / "run") + [
        "embeddings.options.hot_share=0", "embeddings.table_sizes=auto"])
    info = dataset_info(config)
    model, arch = build_unsharded(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"))
    with pytest.raises(ValueError, match="has no inference hooks"):
        write_artifact(model, arch.module, config, info.feature_names, info.num_embeddings_per_feature, "fp32",
                       tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
