"""Checkpoints across world sizes and the single-file inference export.

- 2 ranks -> 4 ranks: the row-wise shards are re-split and the 4-rank model gives the 2-rank model's outputs;
  training resumed on 4 ranks (same global batch) ends where the uninterrupted 2-rank run ends, up to float32
  summation order.
- ``compactrec export``: one inference artifact; ``trainer.serve.artifact.load`` rebuilds it in a plain single process
  (fbgemm's inference TBE, fp32 tables) and it scores like the sharded model; the fp32 rows of ``full`` are a stock
  torchrec DLRM's tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from tests.conftest import tiny_overrides
from tests.dist_utils import run_multiprocess
from tests.trainer.test_checkpoint import EXTRA, PRESET, REPO, _load_and_predict, _train
from trainer.train.checkpoint import latest_checkpoint
from trainer.config import load_config


def _predictions(preset: str, overrides: List[str], run: Path, world_size: int) -> torch.Tensor:
    """Logits of the first validation rows (2048 in all) of a model loaded from ``run``'s newest checkpoint."""
    per_rank = 2048 // world_size
    outs = run_multiprocess(_load_and_predict_preset, world_size,
                            args=(preset, overrides + [f"data.eval_batch_size={per_rank}"], str(run)))
    return torch.cat([o["after"] for o in outs])


def _load_and_predict_preset(rank: int, world_size: int, preset: str, overrides: List[str],
                             run_dir: str) -> Dict[str, torch.Tensor]:
    import tests.trainer.test_checkpoint as tc

    tc.PRESET = preset  # this spawned process only
    return _load_and_predict(rank, world_size, overrides, run_dir)


def test_resume_on_four_ranks_matches_two_rank_run(tiny_dataset: Path, tmp_path: Path) -> None:
    common = EXTRA + ["training.checkpoint_every=4", "training.final_test=false"]
    full = run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, tmp_path / "full") + common,))
    half = tmp_path / "half"
    run_multiprocess(_train, 2, args=(tiny_overrides(tiny_dataset, half) + common + ["training.max_steps=6"],))
    # 4 ranks x 128 = the same global batch of 512: the data position carries over
    resumed = run_multiprocess(_train, 4, args=(tiny_overrides(tiny_dataset, half) + common + [
        "data.batch_size=128", "training.resume=latest"],))
    assert full[0]["result"]["steps"] == resumed[0]["result"]["steps"] == 12
    a, b = full[0]["result"]["val"], resumed[0]["result"]["val"]
    assert abs(a["auc"] - b["auc"]) < 1e-4 and abs(a["logloss"] - b["logloss"]) < 1e-4
    # the replicated dense parameters are whole on every rank: compare them directly
    fs, rs = full[0]["state"], resumed[0]["state"]
    dense = [k for k in fs if "dense_arch" in k or "over_arch" in k]
    assert dense
    for key in dense:
        torch.testing.assert_close(rs[key], fs[key], rtol=1e-4, atol=1e-5)
    assert [e["step"] for e in resumed[0]["result"]["evals"]] == [3, 6, 12]


def _export_and_compare(preset: str, overrides: List[str], run: Path, tmp_path: Path,
                        sharded: torch.Tensor) -> Dict[str, Any]:
    from trainer.commands.cli import main
    from trainer.data import loader
    from trainer.serve.artifact import load, read_artifact

    out = tmp_path / "model.pt"
    assert main(["export", str(REPO / "configs" / preset), *overrides, "--out", str(out)]) == 0
    payload = read_artifact(out)
    assert payload["checkpoint"]["step"] == 4 and payload["checkpoint"]["world_size"] == 2
    model = load(out)
    config = load_config(REPO / "configs" / preset, overrides + ["data.eval_batch_size=2048"])
    batch = next(iter(loader.make_batches(config.data, "val", 0, 1)))
    with torch.no_grad():  # raw ids for every method: full reduces them mod rows itself
        logits = model(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(logits, sharded, rtol=1e-5, atol=1e-6)
    return {"payload": payload, "dense": batch.dense_features, "sparse": batch.sparse_features, "logits": logits}


def test_two_rank_checkpoint_loads_into_four_ranks_and_exports_for_one_process(tiny_dataset: Path,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = tiny_overrides(tiny_dataset, run) + EXTRA
    run_multiprocess(_train, 2, args=(base + ["training.max_steps=4", "training.checkpoint_every=4",
                                              "training.final_test=false"],))
    two = _predictions(PRESET, base, run, 2)
    four = _predictions(PRESET, base, run, 4)  # row-wise shards re-split over 4 ranks
    # row-wise pooled sums are reduced over 2 vs 4 shards: equal up to float32 summation order
    torch.testing.assert_close(four, two, rtol=1e-5, atol=1e-6)
    # MEM-REC export: one process, no process group, the compressed module unsharded
    done = _export_and_compare(PRESET, base, run, tmp_path, two)
    sparse = done["payload"]["sparse"]
    assert sparse["form"] == "memrec" and set(sparse["parameters"]) == {"weight_table"}
    # the token table was row-wise sharded over the 2 ranks; the export holds it whole (fp32: 4 bytes a value)
    assert sparse["tables"]["memrec_tokens"]["weight"].shape == (2000, 4 * 16)


def test_export_full_loads_into_a_stock_torchrec_dlrm(tiny_dataset: Path, tmp_path: Path) -> None:
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from trainer.train.ids import reduce_ids

    run = tmp_path / "run"
    base = tiny_overrides(tiny_dataset, run) + ["training.evals_per_epoch=0", "training.final_test=false",
                                                "sharding.default_sharding_types=[row_wise]"]
    run_multiprocess(_train_preset, 2, args=("default.yaml", base + ["training.max_steps=4",
                                                                      "training.checkpoint_every=4"]))
    done = _export_and_compare("default.yaml", base, run, tmp_path, _predictions("default.yaml", base, run, 2))
    payload = done["payload"]
    cfg = payload["config"]["model"]
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=cfg["embedding_dim"], num_embeddings=n,
                                 feature_names=[f])
              for f, n in zip(payload["feature_names"], payload["num_embeddings_per_feature"])]
    stock = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
                 dense_arch_layer_sizes=cfg["dense_arch_layer_sizes"], over_arch_layer_sizes=cfg["over_arch_layer_sizes"])
    rows = {f"{payload['sparse_path']}.embedding_bags.{name}.weight": t["weight"].view(torch.float32)
            for name, t in payload["sparse"]["tables"].items()}
    stock.load_state_dict({**payload["dense_state_dict"], **rows}, strict=True)
    stock.eval()
    with torch.no_grad():
        logits = stock(done["dense"], reduce_ids(done["sparse"], torch.tensor(payload["num_embeddings_per_feature"])))
    # nn.EmbeddingBag and fbgemm's TBE over the same fp32 rows: equal up to summation order
    torch.testing.assert_close(logits.squeeze(-1), done["logits"], rtol=1e-5, atol=1e-6)
    assert latest_checkpoint(run) is not None


def _train_preset(rank: int, world_size: int, preset: str, overrides: List[str]) -> Dict[str, Any]:
    import tests.trainer.test_checkpoint as tc

    tc.PRESET = preset
    return _train(rank, world_size, overrides)
