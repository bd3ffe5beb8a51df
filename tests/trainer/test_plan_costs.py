"""``sharding.offer_data_parallel``: the planner chooses between row-wise and replicated token tables by its cost
model, and ``compactrec plan`` prints both candidates' estimated costs with the chosen one marked; our extensions
on CPU topologies: gloo's bandwidth for every collective, and the input all-to-all (with MEM-REC's per-lookup
weights) counted."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ParameterConstraints

from embeddings.types import TopologyInfo
from trainer.commands.cli import main
from trainer.config import load_config
from trainer.prepare.dataset_info import dataset_info
from trainer.train.model import TrainModel, build_dlrm, build_sparse_arch, sparse_context
from trainer.train.optim import apply_sparse_optimizer
from trainer.train.planning import constraints, make_enumerator, topology, with_data_parallel
from sharding.sharders import sharders_for

REPO = Path(__file__).resolve().parents[2]
MEMREC_TB = str(REPO / "configs" / "memrec_tb_dlrmv2.yaml")
OFFER = "sharding.offer_data_parallel=true"


def _cost_lines(out: str) -> Dict[str, Tuple[bool, List[str]]]:
    """sharding type -> (planned?, fields) of the memrec_tokens candidate lines."""
    lines = {}
    for line in out.splitlines():
        fields = line[1:].split()
        if fields and fields[0] == "memrec_tokens" and len(fields) > 8:
            lines[fields[1]] = (line.startswith("*"), fields)
    return lines


CPU2 = ["--world-size", "2", "--local-world-size", "2", "--device", "cpu"]
BIG_TOKENS = "embeddings.options.num_token_rows=20000000"  # 9.5 GiB: its all-reduce outweighs the all-to-alls


@pytest.mark.parametrize("args,planned,other", [
    (["--world-size", "128", "--local-world-size", "8", "--device", "cuda"], "data_parallel", "table_row_wise"),
    (CPU2, "data_parallel", "row_wise"),
    ([*CPU2, BIG_TOKENS], "row_wise", "data_parallel"),
    # one rank: nothing is sent, the replicated table's dense update is all that differs (measured 0.34-0.61x)
    (["--world-size", "1", "--local-world-size", "1", "--device", "cpu"], "table_wise", "data_parallel"),
])
def test_plan_shows_both_placements_and_the_cheaper_one_is_planned(capsys: pytest.CaptureFixture, args: List[str],
                                                                   planned: str, other: str) -> None:
    assert main(["plan", MEMREC_TB, OFFER, *args]) == 0
    out = capsys.readouterr().out
    costs = _cost_lines(out)
    assert set(costs) == {planned, other}
    assert costs[planned][0] and not costs[other][0]
    rank_max = {t: float(fields[-3]) for t, (_, fields) in costs.items()}
    assert rank_max[planned] < rank_max[other]  # the planner took the cheaper estimate
    placed = [line.split() for line in out.splitlines() if line.startswith("memrec_tokens ")]
    assert placed and placed[0][1] == planned


def test_without_the_option_token_tables_stay_row_wise(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", MEMREC_TB, "--world-size", "128", "--local-world-size", "8", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("memrec_tokens ")] == ["table_row_wise"]
    assert "no table was offered several sharding types" in out and not _cost_lines(out)


def test_only_row_placed_fused_tables_are_offered_data_parallel() -> None:
    row = ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"], is_weighted=True)
    offered = with_data_parallel(row)
    assert offered.sharding_types == ["row_wise", "data_parallel"] and offered.compute_kernels == ["fused", "dense"]
    assert offered.is_weighted  # everything else kept
    replicated = ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
    assert with_data_parallel(replicated) is replicated
    free = ParameterConstraints()  # left to the planner: already free to choose
    assert with_data_parallel(free) is free


def _token_perfs(device: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    """memrec_tokens' first-shard Perf per sharding type: ours vs TorchRec's estimators alone, 2 ranks."""
    config = load_config(MEMREC_TB, [OFFER])
    info = dataset_info(config, require_data=False)
    arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                    torch.device("meta")))
    model = TrainModel(build_dlrm(config, arch, dense_device=torch.device("meta")))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = sharders_for(arch.module)
    topo = TopologyInfo(2, 2, device)
    ours = make_enumerator(config, arch, sharders, topo)
    plain = EmbeddingEnumerator(topology=topology(topo, config.sharding), batch_size=config.data.batch_size,
                                constraints=constraints(arch, sharders, config.sharding, topo))

    def perfs(enumerator: EmbeddingEnumerator) -> Dict[str, object]:
        return {o.sharding_type: o.shards[0].perf for o in enumerator.enumerate(model, sharders)
                if o.name == "memrec_tokens"}

    return perfs(ours), perfs(plain)


def test_input_dist_counts_on_cpu_with_lookup_weights_and_not_on_cuda() -> None:
    ours, plain = _token_perfs("cpu")
    row, row_plain = ours["row_wise"], plain["row_wise"]
    assert row_plain.input_dist_comms > 0  # type: ignore[attr-defined]
    assert row.input_dist_comms == pytest.approx(1.5 * row_plain.input_dist_comms)  # type: ignore[attr-defined]
    assert row.fwd_comms == pytest.approx(row_plain.fwd_comms + row.input_dist_comms)  # type: ignore[attr-defined]
    assert ours["data_parallel"] == plain["data_parallel"]
    ours, plain = _token_perfs("cuda")
    assert ours == plain  # on CUDA the pipeline overlaps the input dist: TorchRec's model as it is


def test_cpu_topologies_price_every_collective_at_gloo_bandwidth() -> None:
    """Doubling ``sharding.cpu_comms_gbps`` cuts both candidates' communication estimates on CPU: the row-wise one's
    about in half, the replicated one's less (TorchRec books the dense update, priced at memory bandwidth, under
    backward communication too)."""
    def comms(gbps: float) -> Dict[str, float]:
        config = load_config(MEMREC_TB, [OFFER, f"sharding.cpu_comms_gbps={gbps}"])
        info = dataset_info(config, require_data=False)
        arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                        torch.device("meta")))
        model = TrainModel(build_dlrm(config, arch, dense_device=torch.device("meta")))
        apply_sparse_optimizer(arch.module, config.optimizer)
        sharders = sharders_for(arch.module)
        enumerator = make_enumerator(config, arch, sharders, TopologyInfo(2, 2, "cpu"))
        return {o.sharding_type: o.shards[0].perf.fwd_comms + o.shards[0].perf.bwd_comms  # type: ignore[union-attr]
                for o in enumerator.enumerate(model, sharders) if o.name == "memrec_tokens"}

    slow, fast = comms(1.0), comms(2.0)
    assert slow["row_wise"] / 2 <= fast["row_wise"] < 0.55 * slow["row_wise"]
    assert slow["data_parallel"] / 2 <= fast["data_parallel"] < 0.7 * slow["data_parallel"]


KAGGLE = str(REPO / "configs" / "criteo_kaggle.yaml")
ROBE_100X = ["embeddings.kind=robe", "embeddings.options={budget: 0.01, chunk_size: 4}"]


def _robe_lines(out: str) -> Dict[str, Tuple[bool, List[str]]]:
    lines = {}
    for line in out.splitlines():
        fields = line[1:].split()
        if fields and fields[0] == "robe_memory" and len(fields) > 8:
            lines[fields[1]] = (line.startswith("*"), fields)
    return lines


def test_fused_replicas_are_priced_by_their_all_gather_and_planned(capsys: pytest.CaptureFixture) -> None:
    """ROBE-Z at 1/100 of the Kaggle tables (21.6 MB) on 2 CPU ranks: TorchRec prices the replicated array as a dense
    all-reduce of its whole gradient, which made row-wise win; replicated on the fused operator it sends the ranks'
    output gradients and addresses (``FusedReplicaEstimator``), less than the row-wise all-to-alls, and is planned."""
    from embeddings.ops import chunk_bag

    if not chunk_bag.available():
        pytest.skip("the C++ library did not build here: the fused replicas do not run")
    assert main(["plan", KAGGLE, OFFER, *ROBE_100X, *CPU2]) == 0
    costs = _robe_lines(capsys.readouterr().out)
    assert set(costs) == {"data_parallel", "row_wise"}
    assert costs["data_parallel"][0] and not costs["row_wise"][0]
    with pytest.MonkeyPatch.context() as patch:  # the same table without the operator: TorchRec's dense pricing
        patch.setattr(chunk_bag, "available", lambda: False)
        assert main(["plan", KAGGLE, OFFER, *ROBE_100X, *CPU2]) == 0
    dense = _robe_lines(capsys.readouterr().out)
    fused_dp, dense_dp = float(costs["data_parallel"][1][-3]), float(dense["data_parallel"][1][-3])
    assert fused_dp < dense_dp  # the all-gather of gradients and addresses is cheaper than the table's all-reduce
