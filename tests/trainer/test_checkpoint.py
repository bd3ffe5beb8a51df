"""Sharded checkpoints: a run stopped half-way and resumed ends bitwise where an uninterrupted run ends;
checkpoints are atomic, pruned, and load into another world size."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from tests.conftest import memrec_rows, tiny_overrides
from tests.dist_utils import run_multiprocess
from trainer.train.checkpoint import MARKER, Segment, latest_checkpoint, list_checkpoints, read_metadata, segment_plan
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
# MEM-REC: row-wise sharded token table (fused adagrad state), replicated DDP weight table, dense MLPs (adagrad)
PRESET = "memrec_small.yaml"
EXTRA = memrec_rows(2000) + ["training.evals_per_epoch=2", "data.limit_train_batches=12"]


def _local_state(model: Any) -> Dict[str, Any]:
    """Every state_dict entry as this rank holds it: local shards (with offsets) of sharded tensors."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out: Dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            out[key] = [(tuple(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
        else:
            out[key] = value.detach().clone()
    return out


def _train(rank: int, world_size: int, overrides: List[str]) -> Dict[str, Any]:
    import trainer.train.loop as loop
    from trainer.train.distributed import init_distributed

    built: List[Any] = []
    original = loop.build_sharded_model

    def capture(*args: Any) -> Any:
        model, arch = original(*args)
        built.append(model)
        return model, arch

    loop.build_sharded_model = capture  # type: ignore[assignment]
    config = load_config(REPO / "configs" / PRESET, overrides)
    result = loop.run_training(config, init_distributed("cpu"))
    return {"result": result, "state": _local_state(built[0])}


def _assert_same_state(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert [o for o, _ in a[key]] == [o for o, _ in b[key]], key
            for (_, x), (_, y) in zip(a[key], b[key]):
                assert torch.equal(x, y), key
        else:
            assert torch.equal(a[key], b[key]), key


def test_segment_plan_splits_at_checkpoints_and_resumes() -> None:
    # epoch of 10 steps starting at global step 20, evaluations after 5 and 10, checkpoints every 4 global steps
    plan = segment_plan([5, 5], 20, 4)
    assert plan == [Segment(4, False, True), Segment(1, True, False), Segment(3, False, True), Segment(2, True, False)]
    assert sum(s.steps for s in plan) == 10
    assert segment_plan([5, 5], 20, 4, start_in_epoch=5) == [Segment(3, False, True), Segment(2, True, False)]
    assert segment_plan([5, 5], 0, None, start_in_epoch=3) == [Segment(2, True, False), Segment(5, True, False)]
    assert segment_plan([4, 6], 0, 5) == [Segment(4, True, False), Segment(1, False, True), Segment(5, True, True)]


def test_resume_matches_uninterrupted_run_bitwise(tiny_dataset: Path, tmp_path: Path) -> None:
    common = EXTRA + ["training.checkpoint_every=4", "training.keep_checkpoints=2"]
    full = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, tmp_path / "full") + common,))
    half_dir = tmp_path / "half"
    half = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, half_dir) + common + ["training.max_steps=6"],))
    # checkpoints at 4 and the end (6); keep 2
    assert [p.name for p in list_checkpoints(half_dir)] == ["step_4", "step_6"]
    meta = read_metadata(latest_checkpoint(half_dir))
    assert (meta["epoch"], meta["step"], meta["step_in_epoch"], meta["world_size"]) == (0, 6, 6, 2)
    resumed = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, half_dir) + common
                                                + ["training.resume=latest"],))
    assert full[0]["result"]["steps"] == resumed[0]["result"]["steps"] == 12
    for rank in range(2):
        _assert_same_state(full[rank]["state"], resumed[rank]["state"])
        f, r = full[rank]["result"], resumed[rank]["result"]
        assert f["val"] == r["val"] and f["test"] == r["test"]
        assert [e["step"] for e in r["evals"]] == [3, 6, 12]  # the stopped run's evaluations, then the resumed one
    # the half-way state really differs from the end state (the comparison above is not vacuous)
    with pytest.raises(AssertionError):
        _assert_same_state(half[0]["state"], full[0]["state"])
    # pruned to the newest two; no temp directories left
    assert [p.name for p in list_checkpoints(half_dir)] == ["step_8", "step_12"]
    assert not list((half_dir / "checkpoints").glob("*.tmp"))


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step_8").mkdir(parents=True)  # no marker (e.g. a partial copy): not a checkpoint
    (root / "step_4").mkdir()
    (root / "step_4" / MARKER).write_text('{"format_version": 1}')
    (root / "step_12.tmp").mkdir()
    (root / "step_12.tmp" / MARKER).write_text('{"format_version": 1}')
    assert latest_checkpoint(tmp_path) == root / "step_4"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        read_metadata(root / "step_8")


def _load_and_predict(rank: int, world_size: int, overrides: List[str], run_dir: str) -> Dict[str, torch.Tensor]:
    """Logits of the first validation batch before and after loading the newest checkpoint of ``run_dir``."""
    from trainer.train.checkpoint import load_model_state
    from trainer.prepare.dataset_info import dataset_info
    from trainer.train.distributed import init_distributed
    from trainer.train.ids import reduce_ids_into_tables
    from trainer.train.loop import _batches, build_sharded_model

    config = load_config(REPO / "configs" / PRESET, overrides)
    ctx = init_distributed("cpu")
    info = dataset_info(config)
    model, arch = build_sharded_model(config, ctx, info)
    transform = reduce_ids_into_tables(info.num_embeddings_per_feature) if arch.ids == "table" else (lambda b: b)
    batch = next(_batches(config, "val", ctx, transform))
    model.eval()
    with torch.no_grad():
        before = model(batch)[1][1].clone()
        path = latest_checkpoint(Path(run_dir))
        assert path is not None
        load_model_state(path, model)
        after = model(batch)[1][1].clone()
    return {"before": before, "after": after}


def test_checkpoint_of_two_ranks_loads_into_one(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = tiny_overrides(tiny_dataset, run) + EXTRA
    run_multiprocess(_train, 2, args=(base + ["training.max_steps=4", "training.checkpoint_every=4",
                                              "training.final_test=false"],))
    two = run_multiprocess(_load_and_predict, 2, args=(base, str(run)))
    # one rank with twice the eval batch sees the two ranks' first batches concatenated
    (one,) = run_multiprocess(_load_and_predict, 1, args=(base + ["data.eval_batch_size=2048"], str(run)))
    expected = torch.cat([two[0]["after"], two[1]["after"]])
    assert not torch.allclose(one["before"], one["after"])  # the load changed the model
    # row-wise pooled sums are reduced across 2 shards in one case and summed in one table in the other:
    # equal up to float32 summation order
    torch.testing.assert_close(one["after"], expected, rtol=1e-5, atol=1e-6)


# learning rates that make the loss NaN within a few steps
DIVERGE = ["optimizer.sparse_lr=1.0e+30", "optimizer.dense_lr=1.0e+30", "training.checkpoint_every=1",
           "training.max_steps=6", "training.evals_per_epoch=0", "training.final_test=false"]


def test_nonfinite_loss_stops_naming_the_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, run) + EXTRA + DIVERGE + ["training.keep_checkpoints=10"]
    with pytest.raises(RuntimeError, match=r"non-finite loss at step \d+ \(epoch 0, train batch \d+ of the epoch") as err:
        run_multiprocess(_train, 2, args=(overrides,))
    match = re.search(r"non-finite loss at step (\d+) \(epoch 0, train batch (\d+) of the epoch, rows from (\d+)",
                      str(err.value))
    assert match is not None
    bad, batch, rows = map(int, match.groups())
    assert batch == bad - 1 and rows == batch * 2 * 256
    # a checkpoint after every step before the bad one (checkpoint_every=1), none at or after it
    assert [int(p.name.split("_")[1]) for p in list_checkpoints(run)] == list(range(1, bad))



def _cli(rank: int, world_size: int, argv: List[str]) -> int:
    from trainer.commands.cli import main

    return main(argv)


def test_cli_resume_without_checkpoint_is_an_error(tiny_dataset: Path, tmp_path: Path, capfd: Any) -> None:
    argv = ["train", str(REPO / "configs" / PRESET), "--resume"] + tiny_overrides(tiny_dataset, tmp_path / "run") + EXTRA
    assert run_multiprocess(_cli, 1, args=(argv,)) == [2]
    assert "training.resume: no complete checkpoint in" in capfd.readouterr().err
