"""``compactrec lma-index`` on the tiny synthetic log (signatures checked against explicit sets rebuilt from the
data, streamed merging, min_count, errors), and every method of issue 4 training end to end through the real
trainer on 2 gloo ranks, each preset as shipped after ``compactrec prepare`` (LMA index, id counts)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from embeddings import registry
from embeddings.lma import LmaOptions
from embeddings.lma_index import load_index, read_header
from embeddings.lma_minhash import row_ranks, set_signatures, value_keys
from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.commands import cli
from trainer.config import Config, load_config
from trainer.data import loader
from embeddings.lma_build import build_index
from trainer.prepare.run import build_artifact, method_artifact, training_data
from trainer.strict import from_dict
from trainer.prepare.run import prepare

REPO = Path(__file__).resolve().parents[2]
PRESETS = {name: REPO / "configs" / f"{name}_small.yaml" for name in ("lma", "robe", "hash", "qr", "memrec")}


def _lma_config(data: Path, tmp: Path, *extra: str) -> Config:
    return load_config(PRESETS["lma"], tiny_overrides(data, tmp / "run") + [
        f"embeddings.options.index_path={tmp / 'index.npz'}", *extra])


def _explicit_signatures(config: Config, options: LmaOptions, num_functions: int) -> Dict[int, np.ndarray]:
    """Value key -> minhash signature from explicit semantic sets, rebuilt from every training row (read as
    training batches of the configured size plus the rows of the last partial batch)."""
    stream = loader.make_batches(config.data, "train", 0, 1)
    tail = dataclasses.replace(config.data, batch_size=1, train_days=[config.data.train_days[-1]])
    available = loader.count_rows(config.data, "train")
    count = min(options.sample_rows, available)
    sample = np.sort(np.random.default_rng(options.seed).choice(available, size=count, replace=False))
    position = {int(row): i for i, row in enumerate(sample)}
    sets: Dict[int, set] = defaultdict(set)
    offset = 0
    whole = stream.num_batches * config.data.batch_size  # type: ignore[operator]
    rows_in_last_day = loader.count_rows(tail, "train")
    rest = itertools.islice(loader.make_batches(tail, "train", 0, 1), rows_in_last_day - (available - whole), None)
    for batch in itertools.chain(stream, rest):
        kjt = batch.sparse_features
        size, num_features = kjt.stride(), len(kjt.keys())
        rows = torch.repeat_interleave(torch.arange(size).repeat(num_features), kjt.lengths().long())
        features = torch.repeat_interleave(torch.arange(num_features), kjt.lengths().view(num_features, -1).sum(1))
        keys = value_keys(kjt.values(), features)
        if offset == 0:  # the vectorised (row, feature) of each id agrees with the KJT's own per-bag view
            for f, feature in enumerate(kjt.keys()):
                dense = [(row, x) for row, ids in enumerate(kjt[feature].to_dense()) for x in ids.tolist()]
                mine = features == f
                assert dense == list(zip(rows[mine].tolist(), kjt.values()[mine].tolist()))
        for key, row in zip(keys.tolist(), rows.tolist()):
            if offset + row in position:
                sets[key].add(position[offset + row])
        offset += size
    ranks = row_ranks(count, num_functions, options.seed)
    keys = sorted(sets)
    signatures = set_signatures([np.array(sorted(sets[k])) for k in keys], ranks)
    return dict(zip(keys, signatures))


def test_index_signatures_equal_explicit_sets_of_the_sampled_rows(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _lma_config(tiny_dataset, tmp_path, "embeddings.options.sample_rows=300",
                         "embeddings.options.chunk_size=8", "embeddings.options.min_count=1")
    options = method_artifact(config)[1]
    streamed = build_index(options, training_data(config), max_pairs=1000)  # many merges: bounded buffer
    one_pass = build_index(options, training_data(config), max_pairs=10**8)
    assert np.array_equal(streamed.keys, one_pass.keys) and np.array_equal(streamed.signatures, one_pass.signatures)
    header = streamed.header
    assert header.rows_sampled == 300 and header.rows_available == 15000  # every row, not 58 whole batches of 256
    assert header.num_chunks == 2 and header.num_hashes == 2 and header.values_covered == len(streamed.keys)
    assert sum(header.values_per_feature) == header.values_covered
    explicit = _explicit_signatures(config, options, num_functions=4)
    assert sorted(explicit) == streamed.keys.tolist()
    for key, signature in zip(streamed.keys.tolist(), streamed.signatures):
        assert np.array_equal(explicit[key], signature)


def test_run_lma_index_writes_the_artifact_and_min_count_filters(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _lma_config(tiny_dataset, tmp_path, "embeddings.options.min_count=1")
    summary = build_artifact(config)
    header = read_header(tmp_path / "index.npz")
    assert f"{header.values_covered:,} values covered" in summary and "15,000 sampled" in summary
    assert header.values_covered == header.values_seen > 10_000
    filtered = build_artifact(_lma_config(tiny_dataset, tmp_path, "embeddings.options.min_count=3"),
                             out=str(tmp_path / "mc3.npz"))
    index = load_index(tmp_path / "mc3.npz")
    assert "min_count 3" in filtered and 0 < index.header.values_covered < header.values_covered
    assert int(index.counts.min()) >= 3 and index.header.values_seen == header.values_seen


def test_cli_builds_the_index_and_reports_errors(tiny_dataset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides(tiny_dataset, tmp_path / "run")
    out = tmp_path / "cli.npz"
    assert cli.main(["lma-index", str(PRESETS["lma"]), *overrides, "--out", str(out)]) == 0
    assert "values covered" in capsys.readouterr().out and out.is_file()
    assert cli.main(["lma-index", str(PRESETS["hash"]), *overrides, "--out", str(out)]) == 2
    assert "embeddings.kind is 'hash'" in capsys.readouterr().err
    assert cli.main(["lma-index", str(PRESETS["lma"]), *overrides, "embeddings.options.index_path=null"]) == 2
    assert "--out PATH or set embeddings.options.index_path" in capsys.readouterr().err


def test_presets_state_valid_options() -> None:
    for name, path in PRESETS.items():
        config = load_config(path)
        assert config.embeddings.kind == name
        spec = registry.get(name)
        from_dict(spec.options_type, config.embeddings.options, source=str(path), prefix="embeddings.options")


def _train_all(rank: int, world: int, runs: List[List[str]]) -> List[Dict[str, Any]]:
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training

    ctx = init_distributed("cpu")
    results = []
    for args in runs:
        result = run_training(load_config(args[0], args[1:]), ctx)
        results.append({"steps": result["steps"], "val": result["val"], "memory": result["memory"],
                        "embeddings": result["embeddings"]})
    return results


def test_every_method_trains_end_to_end_on_two_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ["training.evals_per_epoch=1", "training.final_test=false", "data.limit_eval_batches=2"]
    runs = []
    for name, preset in PRESETS.items():
        overrides = tiny_overrides(tiny_dataset, tmp_path / name) + common + [f"data.counts_path={tmp_path / 'counts.npz'}"]
        if name == "qr":  # the tiny log's 1/10 cannot hold QR's floor (2 sqrt(n) rows per feature) and hot rows
            overrides.append("embeddings.options.hot_share=0")
        if name == "lma":
            overrides.append(f"embeddings.options.index_path={tmp_path / 'lma.npz'}")
        print(prepare(load_config(preset, overrides)))  # the presets as shipped: id counts, LMA index
        runs.append([str(preset), *overrides])
    results = run_multiprocess(_train_all, world_size=2, args=(runs,))
    for name, r0, r1 in zip(PRESETS, *results):
        assert r0["embeddings"] == name and r0["val"] == r1["val"], name  # global metrics agree on both ranks
        assert r0["steps"] == 14848 // 512, name  # one epoch of global batches of 2 x 256
        assert math.isfinite(r0["val"]["logloss"]) and r0["val"]["auc"] > 0.55, (name, r0["val"])
        memory = r0["memory"]
        assert memory["compression_ratio"] > 1.5 and memory["total_bytes"] == sum(t["bytes"] for t in memory["tables"])
    lma_memory = results[0][0]["memory"]
    dictionary = {t["name"]: t["bytes"] for t in lma_memory["tables"]}
    covered = read_header(tmp_path / "lma.npz").values_covered
    kept = dictionary["lma_index_rows"] // 4  # values in the dictionary at training: 8 B key + 4 B row each
    # the preset's budget: at most the index (hot values leave it), everything within 1/10 of the full tables
    assert dictionary["lma_index_keys"] == 8 * kept and 0 < kept <= covered, (kept, covered)
    assert lma_memory["total_bytes"] <= 0.1 * lma_memory["full_table_bytes"], lma_memory
