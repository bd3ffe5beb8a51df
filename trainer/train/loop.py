"""The training run: build, plan, shard, train with TrainPipelineSparseDist, evaluate, report.

``run_training(config, ctx)`` runs inside an existing (or freshly made) process group, so the same code
serves torchrun/torchx workers, tests and a single process. It builds the run's parts and hands them to a
``TrainingRun`` (``trainer/train/epochs.py``: epochs, segments, steps, rollback), which reports through the
run's ``Reporter`` (``trainer/train/reporting.py``: progress, TensorBoard, metrics.json, MLPerf events).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from embeddings.types import MemoryReport, TopologyInfo
from trainer.train import checkpoint
from trainer.config import Config, OptimizerConfig, save_config
from trainer.data import loader
from trainer.data.records import Batch
from trainer.prepare.dataset_info import DatasetInfo, dataset_info
from trainer.train.distributed import DistContext
from trainer.train.epochs import RunParts, SplitBatches, TrainingRun, evaluate
from trainer.train.ids import reduce_ids_into_tables
from trainer.train.model import SparseArch, TrainModel, build_dlrm, build_sparse_arch, memory_report, sparse_context
from trainer.train.optim import apply_sparse_optimizer, combined_optimizer
from trainer.train.planning import plan_model
from trainer.commands.preflight import train_steps
from trainer.prepare.run import check_prepared
from trainer.train.reporting import Reporter
from sharding.sharders import sharders_for

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_sharded_model(config: Config, ctx: DistContext, info: DatasetInfo) -> tuple[Any, SparseArch]:
    """Sparse arch on ``meta`` (DMP materialises its shards), dense part on the device; planned and wrapped."""
    sparse_ctx = sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                torch.device("meta"), info.pooling_factors, info.id_counts)
    arch = build_sparse_arch(config, sparse_ctx)
    model = TrainModel(build_dlrm(config, arch, dense_device=ctx.device))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = sharders_for(arch.module)
    topo = TopologyInfo(ctx.world_size, ctx.local_world_size, ctx.device.type)
    plan = plan_model(config, model, arch, sharders, topo, pg=torch.distributed.group.WORLD)
    if ctx.is_main:
        logger.info("sharding plan:\n%s", plan)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan, sharders=sharders)
    return dmp, arch


def _batches(config: Config, split: str, ctx: DistContext, transform: Callable[[Batch], Batch],
             skip: int = 0) -> SplitBatches:
    """The split's batches in order; ``skip`` drops the first ones (batches consumed before a resume). The
    stream opens at the first batch asked for; ``bad_row_counts`` are its bad-row counts."""
    return SplitBatches(functools.partial(loader.make_batches, config.data, split, ctx.rank, ctx.world_size),
                        transform, skip)


def _initial_position(config: Config, run_dir: Path, model: Any, optimizer: Any,
                      ctx: DistContext) -> Tuple[checkpoint.TrainPosition, bool]:
    """Where training starts (``training.resume``) and whether that came from a checkpoint."""
    latest: Optional[Path] = checkpoint.latest_checkpoint(run_dir)
    mode = config.training.resume
    if mode == "latest" and latest is None:
        raise FileNotFoundError(f"training.resume: no complete checkpoint in {checkpoint.checkpoint_root(run_dir)}")
    if mode == "never" and latest is not None and config.training.checkpoint_every is not None:
        raise FileExistsError(
            f"{checkpoint.checkpoint_root(run_dir)} holds checkpoints of an earlier run (newest: {latest.name}) that "
            "this run would overwrite and prune: continue it with --resume (training.resume=latest or auto), or "
            "choose another training.run_dir")
    if latest is None or mode == "never":
        return checkpoint.TrainPosition(), False
    return checkpoint.load_checkpoint(latest, model, optimizer, config, ctx), True


def _train_steps(config: Config, ctx: DistContext) -> tuple[int, int]:
    """(steps per epoch, total steps) for the configured data, limits and max_steps; warns on a tiny run."""
    budget = train_steps(config, ctx.world_size, loader.count_rows(config.data, "train"))
    if budget.warning is not None and ctx.is_main:
        logger.warning("%s", budget.warning)
    return budget.steps_per_epoch, budget.total


def id_transform(arch: SparseArch, info: DatasetInfo) -> Callable[[Batch], Batch]:
    """The data path's id handling: ``id mod rows`` for a method taking table ids ("table"), else none."""
    if arch.ids != "table":
        return lambda batch: batch
    if info.num_embeddings_per_feature is None:  # a "table" method is built from the sizes: unreachable
        raise ValueError(f"embeddings.kind={arch.spec.name} reduces ids mod its table sizes, which are unknown")
    return reduce_ids_into_tables(info.num_embeddings_per_feature)


def run_training(config: Config, ctx: DistContext) -> Dict[str, Any]:
    """Train and evaluate as configured; returns the metrics written to ``metrics.json`` on rank 0.

    Evaluates ``training.evals_per_epoch`` times per epoch on the validation split (epoch fractions recorded),
    stops at the first validation AUC >= ``training.target_auc`` when set, then scores the test split.
    """
    seed_everything(config.training.seed)
    run_dir = Path(config.training.run_dir)
    optim_cfg = config.optimizer.scaled(config.data.batch_size * ctx.world_size)
    info = dataset_info(config)
    check_prepared(config)  # an LMA index built from other data or options stops the run here, naming it
    model, arch = build_sharded_model(config, ctx, info)
    optimizer = combined_optimizer(model, optim_cfg)
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device, execute_all_batches=True)
    mem = memory_report(arch, config.optimizer.sparse)
    transform = id_transform(arch, info)
    steps_per_epoch, total = _train_steps(config, ctx)
    reporter = Reporter(config, ctx, run_dir, total, mem)
    if ctx.is_main:
        save_config(config, run_dir / "config.yaml")
    reporter.start_run(info, optim_cfg, steps_per_epoch, loader.count_rows(config.data, "val"))
    position, loaded = _initial_position(config, run_dir, model, optimizer, ctx)
    parts = RunParts(config, ctx, run_dir, model, optimizer, pipeline, reporter, _batches, transform,
                     steps_per_epoch, total)
    run = TrainingRun(parts, position, loaded)
    run.train()
    return run.finish(_run_facts(config, ctx, model, optim_cfg, mem))


def _run_facts(config: Config, ctx: DistContext, model: Any, optim_cfg: OptimizerConfig,
               mem: MemoryReport) -> Dict[str, Any]:
    """The metrics that describe the run's setup rather than its progress."""
    return {
        "world_size": ctx.world_size,
        "global_batch": config.data.batch_size * ctx.world_size,
        "learning_rates": {"sparse": optim_cfg.sparse_lr, "dense": optim_cfg.dense_lr},
        "embeddings": config.embeddings.kind,
        # table -> "sharding_type/compute_kernel" the planner chose
        "placement": {table: f"{ps.sharding_type}/{ps.compute_kernel}" for module_plan in model.plan.plan.values()
                      for table, ps in module_plan.items()},
        "memory": mem.as_dict(),
        "target_auc": config.training.target_auc,
    }


def load_metrics(run_dir: Path) -> Dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


__all__ = ["run_training", "build_sharded_model", "evaluate", "load_metrics"]
