"""A method added from outside the package is one file pair and a preset: ``toyrec_method.py`` (options, layout,
module, data artifact hooks, spec) and ``toyrec_sharding.py`` (its sharder, registered by module type), written
to a directory outside the repository and named in the config's ``embeddings.plugins``. No file of the trainer,
the CLI or the exporter knows it, yet ``compactrec prepare`` builds and checks its artifact, ``plan`` places its
tables, training on 2 gloo ranks checkpoints it (recording its artifact), and ``export`` -> ``score`` equals the
training evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.commands.cli import main

METHOD = '''
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.provenance import check_provenance, differences
from embeddings.remap import (Aux, RemapLayout, RemappedEmbeddingBagCollection, feature_of_values, pooling_type,
                              remapped_spec, uniform_init)
from embeddings.types import ArtifactHooks, SparseArchContext, TrainingData


@dataclass
class ToyOptions:
    num_rows: int = 64
    pooling: str = "sum"
    stats_path: Optional[str] = None  # the data artifact: rows of the training split and the data's fingerprint


class ToyLayout(RemapLayout):
    """Each feature's raw ids mod num_rows (+ the feature, so features land on different rows) in a table of its own."""

    method = "toy"

    def __init__(self, ctx: SparseArchContext, options: ToyOptions) -> None:
        super().__init__(ctx.feature_names, ctx.embedding_dim, "toy")
        self.options = options

    def inner_configs(self) -> List[EmbeddingBagConfig]:
        n = self.options.num_rows
        return [EmbeddingBagConfig(name=f"toy_{f}", embedding_dim=self.embedding_dim, num_embeddings=n,
                                   feature_names=[f], pooling=pooling_type(self.options.pooling), init_fn=uniform_init(n))
                for f in self.feature_names]

    def logical_configs(self) -> List[EmbeddingBagConfig]:
        return self.inner_configs()

    def planner_pooling_factors(self, pooling_factors: Sequence[float]) -> Dict[str, List[float]]:
        return {f"toy_{f}": [float(p)] for f, p in zip(self.feature_names, pooling_factors)}

    def expand(self, features: KeyedJaggedTensor, buffers: Mapping[str, torch.Tensor],
               stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, Aux]:
        features = self.select_features(features)
        values = features.values().to(torch.int64)
        feature, _ = feature_of_values(features.lengths(), len(self.feature_names), values.numel())
        rows = torch.remainder(values + feature, self.options.num_rows)
        return KeyedJaggedTensor(keys=self.feature_names, values=rows, lengths=features.lengths(),
                                 stride=features.stride()), None


class ToyEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    def __init__(self, ctx: SparseArchContext, options: ToyOptions) -> None:
        super().__init__(ToyLayout(ctx, options), ctx.device, ctx.all_pooling_factors())


def _build(options: Any, data: TrainingData, out: str) -> str:
    rows = data.num_rows()
    Path(out).write_text(json.dumps({"rows": rows, "source": data.fingerprint()}))
    return f"toy stats {out}: {rows} rows"


def _recorded(path: str) -> Dict[str, Any]:
    return {"source": json.loads(Path(path).read_text())["source"]}


def _differences(options: Any, data: TrainingData) -> Optional[List[str]]:
    path = options.stats_path
    if path is None or not Path(path).is_file():
        return None
    return differences(_recorded(path), {"source": data.fingerprint()})


def _check(options: Any, data: TrainingData, rebuild: str) -> None:
    path = options.stats_path
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"toy stats {path} do not exist; build them with `{rebuild}`")
    check_provenance(path, _recorded(path), {"source": data.fingerprint()}, rebuild, what="toy stats")


HOOKS = ArtifactHooks(name="toy stats", path_option="embeddings.options.stats_path",
                      path=lambda options: options.stats_path, build=_build, differences=_differences, check=_check)
SPEC = registry.register(dataclasses.replace(
    remapped_spec("toy", ToyOptions, ToyEmbeddingBagCollection, "toy: ids mod num_rows"), artifact=HOOKS))
'''

SHARDING = '''
from typing import Type

from sharding.registry import register_sharder
from sharding.remap import RemappedEmbeddingBagCollectionSharder
from toyrec_method import ToyEmbeddingBagCollection


class ToySharder(RemappedEmbeddingBagCollectionSharder):
    @property
    def module_type(self) -> Type[ToyEmbeddingBagCollection]:  # type: ignore[override]
        return ToyEmbeddingBagCollection


register_sharder(ToyEmbeddingBagCollection, ToySharder)
'''


def _train(rank: int, world_size: int, plugin_dir: str, config: str, overrides: List[str]) -> Dict[str, Any]:
    sys.path.insert(0, plugin_dir)
    from trainer.config import load_config
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    return run_training(load_config(config, overrides), init_distributed("cpu"))


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "toyrec_method.py").write_text(METHOD)
    (directory / "toyrec_sharding.py").write_text(SHARDING)
    monkeypatch.syspath_prepend(str(directory))
    return directory


def test_a_method_from_outside_the_package_prepares_plans_trains_checkpoints_and_exports(
        plugin: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.serve.score import run_score

    stats = tmp_path / "stats.json"
    config = tmp_path / "toy.yaml"
    config.write_text("embeddings:\n  kind: toy\n  plugins: [toyrec_method, toyrec_sharding]\n"
                      f"  options: {{num_rows: 97, stats_path: {stats}}}\n")
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, run) + ["training.checkpoint_every=10", "training.evals_per_epoch=1"]

    assert main(["train", str(config), *overrides]) == 2  # the artifact is checked before training
    assert "toy stats" in capsys.readouterr().err
    assert main(["prepare", str(config), *overrides]) == 0
    assert json.loads(stats.read_text())["rows"] == 15000
    capsys.readouterr()
    assert main(["prepare", str(config), *overrides]) == 0
    assert "toy stats" in (kept := capsys.readouterr().out) and "matches the config and the data: kept" in kept

    assert main(["plan", str(config), *overrides, "--world-size", "2", "--local-world-size", "2",
                 "--device", "cpu"]) == 0
    planned = capsys.readouterr().out
    assert all(f"toy_{f}" in planned for f in ("cat_0", "cat_25")), planned

    r0, r1 = run_multiprocess(_train, world_size=2, args=(str(plugin), str(config), overrides))
    assert r0["val"] == r1["val"] and r0["embeddings"] == "toy" and r0["val"]["auc"] > 0.55
    checkpoints = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert checkpoints and int(checkpoints[-1].name.split("_")[1]) == r0["steps"]
    marker = json.loads(next(checkpoints[-1].glob("*.json")).read_text())
    assert marker["artifact_path"] == str(stats)

    artifact = tmp_path / "toy.pt"
    assert main(["export", str(config), *overrides, "--out", str(artifact)]) == 0
    got = run_score(str(artifact), None, None, "val", None, [], None, False, None)
    assert got["rows"] == r0["val"]["samples"]
    assert abs(got["auc"] - r0["val"]["auc"]) < 1e-6 and got["logloss"] == pytest.approx(r0["val"]["logloss"], rel=1e-5)
