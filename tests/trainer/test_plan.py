"""`compactrec plan`: a multi-node GPU topology planned with no process group, memory per rank shown."""

from __future__ import annotations

from pathlib import Path

import torch

from embeddings.types import TopologyInfo
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.prepare.dataset_info import dataset_info
from trainer.train.model import TrainModel, build_dlrm, build_sparse_arch, sparse_context
from trainer.train.optim import apply_sparse_optimizer
from trainer.train.planning import memory_per_rank, placements, plan_model
from sharding.sharders import sharders_for

REPO = Path(__file__).resolve().parents[2]
TB = REPO / "configs" / "criteo_tb_dlrmv2.yaml"


def _plan(overrides, world_size: int, local_world_size: int):
    config = load_config(TB, overrides)
    info = dataset_info(config, require_data=False)
    arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                    torch.device("meta")))
    model = TrainModel(build_dlrm(config, arch, dense_device=torch.device("meta")))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = sharders_for(arch.module)
    plan = plan_model(config, model, arch, sharders, TopologyInfo(world_size, local_world_size, "cuda"))
    return config, placements(plan, model, sharders, world_size)


def test_criteo_tb_on_16_nodes_of_8_gpus() -> None:
    config, rows = _plan([], 128, 8)
    assert len(rows) == 26
    assert all(0 <= r < 128 for row in rows for r in row.ranks)
    per_rank = memory_per_rank(rows, 128)
    total_rows = sum(config.embeddings.num_embeddings_per_feature)
    # every non-replicated byte of the 97 GiB of tables is placed exactly once
    replicated = sum(max(r.bytes_per_rank.values()) * (len(r.ranks) - 1) for r in rows if r.sharding_type == "data_parallel")
    assert sum(per_rank) - replicated == total_rows * 128 * 4
    assert max(per_rank) <= 80 * 1024**3


def test_table_row_wise_keeps_shards_inside_a_node() -> None:
    _, rows = _plan(["sharding.default_sharding_types=[table_row_wise]"], 16, 8)
    for row in rows:
        assert row.sharding_type == "table_row_wise"
        nodes = {r // 8 for r in row.ranks}
        assert len(nodes) == 1, (row.table, row.ranks)


def test_per_table_override_and_unknown_table() -> None:
    _, rows = _plan(["sharding.tables={t_cat_0: {sharding_types: [row_wise]}}"], 16, 8)
    by_name = {r.table: r for r in rows}
    assert by_name["t_cat_0"].sharding_type == "row_wise" and len(by_name["t_cat_0"].ranks) == 16
    try:
        _plan(["sharding.tables={t_nope: {sharding_types: [row_wise]}}"], 16, 8)
    except ValueError as exc:
        assert "t_nope" in str(exc) and "t_cat_0" in str(exc)
    else:
        raise AssertionError("an unknown table name must be an error")


def test_plan_cli_prints_plan_and_memory(capsys) -> None:
    assert main(["plan", str(TB), "--world-size", "16", "--local-world-size", "8", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 8 cuda" in out and "t_cat_25" in out and "memory per rank" in out
    assert "1.0x smaller" in out
    assert main(["plan", str(TB), "--world-size", "12", "--local-world-size", "8"]) == 2


def test_planner_sees_multi_hot_pooling_factors_of_full_tables() -> None:
    from trainer.train.planning import constraints

    config = load_config(TB)
    sizes = config.embeddings.num_embeddings_per_feature
    pooling = [float(n) for n in config.data.multi_hot_sizes]
    ctx = sparse_context(config, [f"cat_{i}" for i in range(26)], sizes, torch.device("meta"), pooling)
    arch = build_sparse_arch(config, ctx)
    result = constraints(arch, sharders_for(arch.module), config.sharding, TopologyInfo(8, 8, "cuda"))
    assert [result[f"t_cat_{i}"].pooling_factors for i in range(26)] == [[p] for p in pooling]
    assert result["t_cat_20"].sharding_types is None  # placement stays the planner's choice


def test_memrec_weight_table_is_listed_replicated_with_its_exact_bytes(capsys) -> None:
    """The weight table is not planned (a DDP-replicated dense parameter): the plan and the memory per rank
    still count its bytes on every rank, equal to the memory report's."""
    from trainer.train.model import memory_report

    config = load_config(REPO / "configs" / "memrec_tb_dlrmv2.yaml")
    info = dataset_info(config, require_data=False)
    arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                    torch.device("meta")))
    model = TrainModel(build_dlrm(config, arch, dense_device=torch.device("meta")))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = sharders_for(arch.module)
    plan = plan_model(config, model, arch, sharders, TopologyInfo(16, 8, "cuda"))
    assert "memrec_weights" not in plan.plan["model.sparse_arch.embedding_bag_collection"]  # type: ignore[operator]
    rows = placements(plan, model, sharders, 16)
    by_name = {r.table: r for r in rows}
    weights = by_name["weight_table"]
    report = {t.name: t.bytes for t in memory_report(arch, config.optimizer.sparse).tables}
    assert (weights.sharding_type, weights.compute_kernel, weights.ranks) == ("replicated", "ddp", list(range(16)))
    assert set(weights.bytes_per_rank.values()) == {report["memrec_weights"]}
    tokens = [r for r in rows if r.table.startswith("memrec_tokens")]
    assert sum(sum(r.bytes_per_rank.values()) for r in tokens) == sum(
        b for n, b in report.items() if n.startswith("memrec_tokens"))  # row shards: every byte placed once
    assert main(["plan", str(REPO / "configs" / "memrec_tb_dlrmv2.yaml"), "--world-size", "16",
                 "--local-world-size", "8"]) == 0
    assert "weight_table" in capsys.readouterr().out
