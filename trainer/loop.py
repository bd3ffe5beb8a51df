"""The training run: build, plan, shard, train with TrainPipelineSparseDist, evaluate, report.

``run_training(config, ctx)`` runs inside an existing (or freshly made) process group, so the same code
serves torchrun/torchx workers, tests and a single process.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from embeddings.types import TopologyInfo
from trainer import checkpoint
from trainer.config import Config, save_config
from trainer.data import loader
from trainer.data.types import Batch
from trainer.datasets import DatasetInfo, dataset_info
from trainer.distributed import DistContext
from trainer.evaluate import Evaluator
from trainer.ids import reduce_ids_into_tables
from trainer.mlperf_log import MLPerfLogger
from trainer.model import SparseArch, TrainModel, build_dlrm, build_sparse_arch, memory_report, sparse_context
from trainer.optim import apply_sparse_optimizer, combined_optimizer
from trainer.planning import plan_model
from trainer.reporting import Reporter

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_sharded_model(config: Config, ctx: DistContext, info: DatasetInfo) -> tuple[Any, SparseArch]:
    """Sparse arch on ``meta`` (DMP materialises its shards), dense part on the device; planned and wrapped."""
    sparse_ctx = sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                torch.device("meta"), info.pooling_factors)
    arch = build_sparse_arch(config, sparse_ctx)
    model = TrainModel(build_dlrm(config, arch, dense_device=ctx.device))
    apply_sparse_optimizer(arch.module, config.optimizer)
    sharders = arch.spec.sharders(arch.options)
    topo = TopologyInfo(ctx.world_size, ctx.local_world_size, ctx.device.type)
    plan = plan_model(config, model, arch, sharders, topo, pg=torch.distributed.group.WORLD)
    if ctx.is_main:
        logger.info("sharding plan:\n%s", plan)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan, sharders=sharders)
    return dmp, arch


def _batches(config: Config, split: str, ctx: DistContext, transform: Callable[[Batch], Batch],
             skip: int = 0) -> Iterator[Batch]:
    """The split's batches in order; ``skip`` drops the first ones (batches consumed before a resume)."""
    for batch in itertools.islice(loader.make_batches(config.data, split, ctx.rank, ctx.world_size), skip, None):
        yield transform(batch)


def _segments(total_steps: int, evals_per_epoch: int) -> List[int]:
    """Step counts of the training segments between periodic evaluations (sum = total_steps)."""
    n = max(1, min(evals_per_epoch, total_steps)) if total_steps else 1
    bounds = [round(k * total_steps / n) for k in range(n + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def evaluate(pipeline: TrainPipelineSparseDist, model: Any, batches: Iterator[Batch],
             ctx: DistContext) -> Dict[str, float]:
    """One pass over ``batches`` in eval mode through the (drained) pipeline; collective."""
    model.eval()
    evaluator = Evaluator(ctx.device)
    with torch.no_grad():
        while True:
            try:
                evaluator.update(pipeline.progress(batches))
            except StopIteration:
                break
    model.train()
    return evaluator.compute()


def _nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """Whether any rank's loss is NaN/inf (collective, so every rank takes the same branch)."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


def _train_steps(config: Config, ctx: DistContext) -> tuple[int, int]:
    """(steps per epoch, total steps) for the configured data, limits and max_steps."""
    rows = loader.count_rows(config.data, "train")
    steps_per_epoch = rows // (config.data.batch_size * ctx.world_size)
    if config.data.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, config.data.limit_train_batches)
    total = steps_per_epoch * config.training.epochs
    if config.training.max_steps is not None:
        total = min(total, config.training.max_steps)
    if total == 0:
        raise ValueError(f"no training batches: {rows} train rows < global batch {config.data.batch_size * ctx.world_size}")
    return steps_per_epoch, total


def run_training(config: Config, ctx: DistContext) -> Dict[str, Any]:
    """Train and evaluate as configured; returns the metrics written to ``metrics.json`` on rank 0.

    Evaluates ``training.evals_per_epoch`` times per epoch on the validation split (epoch fractions recorded),
    stops at the first validation AUC >= ``training.target_auc`` when set, then scores the test split.
    """
    seed_everything(config.training.seed)
    run_dir = Path(config.training.run_dir)
    global_batch = config.data.batch_size * ctx.world_size
    optim_cfg = config.optimizer.scaled(global_batch)
    mlperf = MLPerfLogger(run_dir / "mlperf.log" if ctx.is_main and config.training.mlperf_log else None)
    mlperf.event("global_batch_size", global_batch)
    mlperf.event("opt_base_learning_rate", optim_cfg.sparse_lr)
    mlperf.event("opt_name", optim_cfg.sparse)
    info = dataset_info(config)
    model, arch = build_sharded_model(config, ctx, info)
    optimizer = combined_optimizer(model, optim_cfg)
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device, execute_all_batches=True)
    mem = memory_report(arch, config.optimizer.sparse)
    transform = reduce_ids_into_tables(info.num_embeddings_per_feature) if arch.spec.ids == "table" else (lambda b: b)
    steps_per_epoch, total = _train_steps(config, ctx)
    reporter = Reporter(config, ctx, run_dir, total, mem)
    if ctx.is_main:
        save_config(config, run_dir / "config.yaml")
    reporter.log_start(info)
    mlperf.event("train_samples", steps_per_epoch * global_batch)
    mlperf.event("eval_samples", loader.count_rows(config.data, "val"))
    mlperf.start("run_start")

    every = config.training.checkpoint_every
    resumed = checkpoint.TrainPosition()
    if config.training.resume:
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            raise FileNotFoundError(f"training.resume: no complete checkpoint in {checkpoint.checkpoint_root(run_dir)}")
        resumed = checkpoint.load_checkpoint(latest, model, optimizer, config, ctx)
    step, evals, reached = resumed.step, resumed.evals, False
    saved_at = step if config.training.resume else -1
    start = time.perf_counter()
    train_time = 0.0
    for epoch in range(resumed.epoch, config.training.epochs):
        epoch_start = epoch * steps_per_epoch
        epoch_steps = min(steps_per_epoch, total - epoch_start)
        if epoch_steps <= 0 or reached:
            break
        skip = resumed.step_in_epoch if epoch == resumed.epoch else 0
        if skip >= epoch_steps:
            continue
        mlperf.start("epoch_start", metadata={"epoch_num": epoch + 1})
        train_iter = _batches(config, "train", ctx, transform, skip=skip)
        eval_segments = _segments(epoch_steps, config.training.evals_per_epoch)
        for segment in checkpoint.segment_plan(eval_segments, epoch_start, every, skip):
            seg_iter = itertools.islice(train_iter, segment.steps)
            t0 = time.perf_counter()
            while True:
                try:
                    loss, *_ = pipeline.progress(seg_iter)
                except StopIteration:
                    break
                step += 1
                if _nonfinite_on_any_rank(loss):  # the update is already applied (fused optimizers): stop
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (epoch {epoch}, train batch {step - epoch_start - 1} of the "
                        f"epoch, rows from {(step - epoch_start - 1) * global_batch}; this rank's loss "
                        f"{float(loss)}); no checkpoint written after it")
                reporter.on_step(step, float(loss))
            train_time += time.perf_counter() - t0
            if segment.evaluate:
                epoch_fraction = step / steps_per_epoch
                mlperf.start("eval_start", metadata={"epoch_num": epoch_fraction})
                metrics = evaluate(pipeline, model, _batches(config, "val", ctx, transform), ctx)
                metrics.update(step=step, epoch=epoch_fraction)
                mlperf.end("eval_stop", metadata={"epoch_num": epoch_fraction})
                mlperf.event("eval_accuracy", metrics["auc"], metadata={"epoch_num": epoch_fraction})
                evals.append(metrics)
                reporter.on_eval("val", step, metrics)
            if segment.checkpoint:  # the pipeline is drained here; after the evaluation so it is recorded
                position = checkpoint.TrainPosition(epoch, step, step - epoch_start, evals)
                checkpoint.save_checkpoint(run_dir, model, optimizer, position, config, ctx,
                                           config.training.keep_checkpoints)
                saved_at = step
            target = config.training.target_auc
            if segment.evaluate and target is not None and evals[-1]["auc"] >= target:
                reached = True
                break
        mlperf.end("epoch_stop", metadata={"epoch_num": epoch + 1})
    if every is not None and saved_at != step:
        final = checkpoint.TrainPosition(step // steps_per_epoch, step, step % steps_per_epoch, evals)
        checkpoint.save_checkpoint(run_dir, model, optimizer, final, config, ctx, config.training.keep_checkpoints)
    status = "success" if config.training.target_auc is None or reached else "aborted"
    mlperf.end("run_stop", metadata={"status": status})
    samples = step * global_batch
    result: Dict[str, Any] = {
        "steps": step,
        "train_samples": samples,
        "train_seconds": train_time,
        # this process's own steps over its own training time (a resumed run counts only what it trained)
        "samples_per_s": (step - resumed.step) * global_batch / max(train_time, 1e-9),
        "wall_seconds": time.perf_counter() - start,
        "world_size": ctx.world_size,
        "global_batch": global_batch,
        "learning_rates": {"sparse": optim_cfg.sparse_lr, "dense": optim_cfg.dense_lr},
        "embeddings": config.embeddings.kind,
        "memory": mem.as_dict(),
        "val": evals[-1],
        "evals": evals,
        "target_auc": config.training.target_auc,
        "target_reached": reached,
        "data_skips": loader.skip_report(),
    }
    if config.training.final_test:
        result["test"] = evaluate(pipeline, model, _batches(config, "test", ctx, transform), ctx)
        mlperf.event("test_accuracy", result["test"]["auc"])
    mlperf.close()
    reporter.finish(result)
    return result


def load_metrics(run_dir: Path) -> Dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


__all__ = ["run_training", "build_sharded_model", "evaluate", "load_metrics"]
