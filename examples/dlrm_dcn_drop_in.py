"""A CompactRec embedding module inside your own TorchRec code (docs/API.md explains each step).

A stock ``torchrec.models.dlrm.DLRM_DCN`` whose EmbeddingBagCollection is replaced by a compressed module of the
same interface (KJT in, KeyedTensor out), then the stock TorchRec workflow: plan with a stock
``EmbeddingShardingPlanner`` (no constraints) and the module's sharders, shard with
``DistributedModelParallel``, train with ``TrainPipelineSparseDist``, checkpoint with
``torch.distributed.checkpoint`` (DCP), and load the checkpoint into the unsharded model in one process for
inference. The data are TorchRec's ``RandomRecDataset`` batches (random labels: this shows the API, not
learning). Run it on 2 CPU processes (gloo), or on GPUs (NCCL, one per process)::

    torchrun --nproc_per_node 2 examples/dlrm_dcn_drop_in.py --kind memrec --checkpoint /tmp/ckpt

``--kind`` is one of full (a stock EmbeddingBagCollection), memrec, hash, robe, lma, qr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.datasets.random import RandomRecDataset
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ModuleSharder
from torchrec.models.dlrm import DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embeddings.hashing_trick import HashedEmbeddingBagCollection, HashOptions
from embeddings.lma import LmaEmbeddingBagCollection, LmaOptions
from embeddings.lma_index import save_index
from embeddings.memrec import MemRecEmbeddingBagCollection, MemRecOptions
from embeddings.qr import QREmbeddingBagCollection, QrOptions
from embeddings.robe import RobeEmbeddingBagCollection, RobeOptions
from embeddings.types import SparseArchContext
from sharding.hashing_trick import HashedEmbeddingBagCollectionSharder
from sharding.lma import LmaEmbeddingBagCollectionSharder
from sharding.memrec import MemRecEmbeddingBagCollectionSharder
from sharding.qr import QREmbeddingBagCollectionSharder
from sharding.robe import RobeEmbeddingBagCollectionSharder
from embeddings.lma_build import build_index_from_batches

KINDS = ("full", "memrec", "hash", "robe", "lma", "qr")
FEATURES = ["user", "item", "ad", "context"]
TABLE_SIZES = [2000, 500, 1000, 50]  # ids are in [0, size): a full table needs them, compressed ones do not
DIM, DENSE_IN, BATCH = 16, 8, 64


def build_embeddings(kind: str, device: torch.device,
                     lma_index: Optional[str] = None) -> Tuple[nn.Module, List[ModuleSharder[nn.Module]]]:
    """The sparse module and the sharders to give the planner and DMP (the same instances)."""
    if kind == "full":
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
                  for f, n in zip(FEATURES, TABLE_SIZES)]
        return EmbeddingBagCollection(tables=tables, device=device), [EmbeddingBagCollectionSharder()]
    if kind == "memrec":  # 500 token rows x DIM + 100 weights instead of 3,550 rows x DIM
        options = MemRecOptions(num_token_rows=500, num_weight_rows=100, num_token_hashes=2)
        return MemRecEmbeddingBagCollection(FEATURES, DIM, options, device=device), [MemRecEmbeddingBagCollectionSharder()]
    ctx = SparseArchContext(FEATURES, TABLE_SIZES, DIM, device)  # table sizes: only for memory_fraction
    if kind == "hash":
        return HashedEmbeddingBagCollection(ctx, HashOptions(memory_fraction=0.25)), [HashedEmbeddingBagCollectionSharder()]
    if kind == "robe":
        return (RobeEmbeddingBagCollection(ctx, RobeOptions(memory_fraction=0.25, chunk_size=4)),
                [RobeEmbeddingBagCollectionSharder()])
    if kind == "lma":
        options = LmaOptions(memory_fraction=0.25, chunk_size=4, index_path=lma_index)
        return LmaEmbeddingBagCollection(ctx, options), [LmaEmbeddingBagCollectionSharder()]
    if kind == "qr":
        return QREmbeddingBagCollection(ctx, QrOptions(num_collisions=4)), [QREmbeddingBagCollectionSharder()]
    raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")


def build_model(embeddings: nn.Module, dense_device: torch.device) -> DLRMTrain:
    """A stock DLRM-DCN around the embedding module; DLRMTrain returns (loss, outputs) for the pipeline."""
    return DLRMTrain(DLRM_DCN(embedding_bag_collection=embeddings, dense_in_features=DENSE_IN,  # type: ignore[arg-type]
                              dense_arch_layer_sizes=[32, DIM], over_arch_layer_sizes=[32, 1], dcn_num_layers=2,
                              dcn_low_rank_dim=8, dense_device=dense_device))


def batches(rank: int, count: int, seed: int = 0) -> List[Batch]:
    """This rank's batches: up to 3 ids per bag (empty bags too)."""
    data = RandomRecDataset(keys=FEATURES, batch_size=BATCH, hash_sizes=TABLE_SIZES, ids_per_features=[3, 1, 2, 3],
                            num_dense=DENSE_IN, manual_seed=seed * 1000 + rank, num_batches=count,
                            num_generated_batches=count)
    return list(data)


def write_lma_index(path: str, rows: List[Batch]) -> None:
    """LMA's minhash index from training batches (``compactrec prepare`` does this from a config)."""
    options = LmaOptions(chunk_size=4, sample_rows=10_000)
    index = build_index_from_batches((b.sparse_features for b in rows), sum(b.labels.numel() for b in rows),
                                     FEATURES, options, chunks=DIM // 4, source={"data": "RandomRecDataset"})
    save_index(index, path)


def shard(model: DLRMTrain, sharders: List[ModuleSharder[nn.Module]],
          device: torch.device) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Stock planner with no constraints, DMP with the module's sharders, fused + dense optimizers."""
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device=device.type),
                                       batch_size=BATCH)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))  # MLPs, replicated tables (DDP)
    return dmp, CombinedOptimizer([dmp.fused_optimizer,
                                   KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adagrad(ps, lr=0.05))])


def run_pipeline(pipeline: TrainPipelineSparseDist, model: nn.Module, data: Sequence[Batch],
                 train: bool) -> List[torch.Tensor]:
    """Train on ``data`` (or score it, ``train=False``) through the pipeline; returns the logits per batch."""
    model.train(train)
    outputs, iterator = [], iter(data)
    with torch.set_grad_enabled(train):
        while True:
            try:
                _, logits, _ = pipeline.progress(iterator)  # DLRMTrain: (loss, logits, labels) detached
            except StopIteration:
                break
            outputs.append(logits.detach().cpu())
    model.train()
    return outputs


def load_for_inference(kind: str, checkpoint: str, lma_index: Optional[str] = None) -> DLRMTrain:
    """The unsharded model on CPU with the checkpoint's weights (DCP gathers every rank's shards)."""
    embeddings, _ = build_embeddings(kind, torch.device("cpu"), lma_index)
    model = build_model(embeddings, torch.device("cpu"))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)  # this process alone, whoever else runs
    model.load_state_dict(state["model"])
    return model.eval()


def run(kind: str, checkpoint: str, device: torch.device, steps: int = 6) -> Dict[str, Any]:
    """Every step on this rank of an initialised process group; returns what happened, for a caller to check."""
    rank = dist.get_rank()
    train_data, test_data = batches(rank, steps), batches(rank, 2, seed=1)
    lma_index = str(Path(checkpoint).with_suffix(".lma_index.npz")) if kind == "lma" else None
    if lma_index is not None:
        if rank == 0:  # one index for every rank, from every rank's training rows
            write_lma_index(lma_index, [b for r in range(dist.get_world_size()) for b in batches(r, steps)])
        dist.barrier()
    embeddings, sharders = build_embeddings(kind, torch.device("meta"), lma_index)  # DMP materialises shards
    model = build_model(embeddings, device)
    apply_optimizer_in_backward(torch.optim.Adagrad, embeddings.parameters(), {"lr": 0.05})  # before planning
    dmp, optimizer = shard(model, sharders, device)
    before = {k: v.clone() for k, v in _local_state(dmp).items()}
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    run_pipeline(pipeline, dmp, [b.to(device) for b in train_data], train=True)
    sharded_logits = run_pipeline(pipeline, dmp, [b.to(device) for b in test_data], train=False)
    dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=checkpoint)
    dist.barrier()
    served = load_for_inference(kind, checkpoint, lma_index)
    with torch.no_grad():
        served_logits = [served(b)[1][1] for b in test_data]
    sharded_module = dmp.module.model.sparse_arch.embedding_bag_collection
    after = _local_state(dmp)
    return {"plan": {name: (p.sharding_type, p.compute_kernel) for module_plan in dmp.plan.plan.values()
                     for name, p in module_plan.items()},  # type: ignore[union-attr]
            "sharded_type": type(sharded_module).__name__, "is_pipelined": bool(sharded_module.is_pipelined),
            "trained": {k: not torch.equal(before[k], after[k]) for k in before},
            "max_inference_error": max(float((a - b).abs().max()) for a, b in zip(sharded_logits, served_logits)),
            "replicated": {k: v.flatten().tolist() for k, v in after.items() if "weight_table" in k}}


def _local_state(dmp: DistributedModelParallel) -> Dict[str, torch.Tensor]:
    """This rank's part of every table (a row-wise shard, or the whole replicated tensor), on CPU."""
    out = {}
    for name, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard_ in value.local_shards():
                out[f"{name}@{list(shard_.metadata.shard_offsets)}"] = shard_.tensor.detach().cpu().clone()
        elif "sparse_arch" in name:
            out[name] = value.detach().cpu().clone()
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="memrec")
    parser.add_argument("--checkpoint", required=True, help="DCP checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        result = run(args.kind, args.checkpoint, device, args.steps)
        if dist.get_rank() == 0:
            print(f"{args.kind}: plan {result['plan']}; {result['sharded_type']} pipelined: {result['is_pipelined']}; "
                  f"inference from {args.checkpoint} matches the sharded model to {result['max_inference_error']:.2e}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
