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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from embeddings.types import TopologyInfo
from trainer.train import checkpoint
from trainer.config import Config, save_config
from trainer.data import loader
from trainer.data.guard import GuardedBatches
from trainer.data.records import Batch
from trainer.prepare.dataset_info import DatasetInfo, dataset_info
from trainer.train.distributed import DistContext
from trainer.train.evaluate import Evaluator
from trainer.train.ids import reduce_ids_into_tables
from trainer.train.mlperf_log import MLPerfLogger
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


class _NonFiniteLoss(Exception):
    """A step's loss was NaN/inf on some rank (raised on every rank: the check is collective)."""

    def __init__(self, message: str, epoch: int, batch: int) -> None:
        super().__init__(message)
        self.epoch, self.batch = epoch, batch


@dataclass
class _LoopState:
    step: int  # batches consumed so far (a batch skipped after a non-finite loss counts as consumed)
    evals: List[Dict[str, Any]]
    skipped: List[Tuple[int, int]]  # (epoch, batch in epoch) left out after a non-finite loss
    saved_at: int  # step of the newest checkpoint of this run (-1: none)
    train_time: float = 0.0
    reached: bool = False


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
    global_batch = config.data.batch_size * ctx.world_size
    optim_cfg = config.optimizer.scaled(global_batch)
    mlperf = MLPerfLogger(run_dir / "mlperf.log" if ctx.is_main and config.training.mlperf_log else None)
    mlperf.event("global_batch_size", global_batch)
    mlperf.event("opt_base_learning_rate", optim_cfg.sparse_lr)
    mlperf.event("opt_name", optim_cfg.sparse)
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
    reporter.log_start(info)
    mlperf.event("train_samples", steps_per_epoch * global_batch)
    mlperf.event("eval_samples", loader.count_rows(config.data, "val"))
    mlperf.start("run_start")

    every, keep = config.training.checkpoint_every, config.training.keep_checkpoints
    position, loaded = _initial_position(config, run_dir, model, optimizer, ctx)
    if config.training.on_nonfinite == "skip" and not loaded:  # a rollback point before the first step
        checkpoint.save_checkpoint(run_dir, model, optimizer, position, config, ctx, keep)
        loaded = True
    first_step = position.step
    state = _LoopState(step=position.step, evals=position.evals,
                       skipped=[(int(b[0]), int(b[1])) for b in position.skipped],
                       saved_at=position.step if loaded else -1)
    start = time.perf_counter()

    def save() -> None:
        """Checkpoint at ``state.step`` (the end of an epoch is recorded as the start of the next one)."""
        epoch = state.step // steps_per_epoch
        at = checkpoint.TrainPosition(epoch, state.step, state.step - epoch * steps_per_epoch, state.evals,
                                      [list(b) for b in state.skipped])
        checkpoint.save_checkpoint(run_dir, model, optimizer, at, config, ctx, keep)
        state.saved_at = state.step

    def train_from(pos: checkpoint.TrainPosition) -> None:
        for epoch in range(pos.epoch, config.training.epochs):
            epoch_start = epoch * steps_per_epoch
            epoch_steps = min(steps_per_epoch, total - epoch_start)
            if epoch_steps <= 0 or state.reached:
                break
            skip = pos.step_in_epoch if epoch == pos.epoch else 0
            if skip >= epoch_steps:
                continue
            mlperf.start("epoch_start", metadata={"epoch_num": epoch + 1})
            train_iter = _batches(config, "train", ctx, transform, skip=skip)
            eval_segments = _segments(epoch_steps, config.training.evals_per_epoch)
            for segment in checkpoint.segment_plan(eval_segments, epoch_start, every, skip):
                first = state.step - epoch_start  # batch index in the epoch where this segment starts
                wanted = [first + i for i in range(segment.steps) if (epoch, first + i) not in state.skipped]
                guard = GuardedBatches(itertools.islice(train_iter, segment.steps), ctx.device, "train")
                seg_iter = (b for i, b in enumerate(guard) if (epoch, first + i) not in state.skipped)
                t0 = time.perf_counter()
                for index in wanted:
                    try:
                        loss, *_ = pipeline.progress(seg_iter)
                    except StopIteration:
                        break
                    state.step = epoch_start + index + 1
                    if _nonfinite_on_any_rank(loss):  # the update is already applied (fused optimizers)
                        raise _NonFiniteLoss(
                            f"non-finite loss at step {state.step} (epoch {epoch}, train batch {index} of the "
                            f"epoch, rows from {index * global_batch}; this rank's loss {float(loss)})",
                            epoch, index)
                    reporter.on_step(state.step, float(loss))
                state.train_time += time.perf_counter() - t0
                state.step = epoch_start + first + guard.count  # batches consumed (skipped ones included)
                if guard.failed:  # every batch before the bad one is trained: keep that state, then report
                    save()
                    guard.raise_if_failed(f"at train batch {first + guard.count} of epoch {epoch} (checkpoint "
                                          f"written at step {state.step}; fix the data and --resume)")
                if segment.evaluate:
                    epoch_fraction = state.step / steps_per_epoch
                    mlperf.start("eval_start", metadata={"epoch_num": epoch_fraction})
                    metrics = _guarded_eval("val")
                    metrics.update(step=state.step, epoch=epoch_fraction)
                    mlperf.end("eval_stop", metadata={"epoch_num": epoch_fraction})
                    mlperf.event("eval_accuracy", metrics["auc"], metadata={"epoch_num": epoch_fraction})
                    state.evals.append(metrics)
                    reporter.on_eval("val", state.step, metrics)
                if segment.checkpoint:  # the pipeline is drained here; after the evaluation so it is recorded
                    save()
                target = config.training.target_auc
                if segment.evaluate and target is not None and state.evals[-1]["auc"] >= target:
                    state.reached = True
                    break
            mlperf.end("epoch_stop", metadata={"epoch_num": epoch + 1})

    def _guarded_eval(split: str) -> Dict[str, float]:
        guard = GuardedBatches(_batches(config, split, ctx, transform), ctx.device, split)
        metrics = evaluate(pipeline, model, guard, ctx)
        if guard.failed:  # evaluation changes no parameters: the training state so far is saved, then reported
            if state.saved_at != state.step:
                save()
            guard.raise_if_failed(f"at {split} batch {guard.count} after training step {state.step} "
                                  f"(checkpoint written at step {state.step})")
        return metrics

    while True:
        try:
            train_from(position)
            break
        except _NonFiniteLoss as bad:
            if config.training.on_nonfinite != "skip":
                raise FloatingPointError(f"{bad}; no checkpoint written after it") from None
            if len(state.skipped) >= config.training.max_nonfinite_skips:
                raise FloatingPointError(f"{bad}; already skipped {len(state.skipped)} batch(es) "
                                         f"{state.skipped} = training.max_nonfinite_skips: stopping") from None
            state.skipped.append((bad.epoch, bad.batch))
            latest = checkpoint.latest_checkpoint(run_dir)
            if latest is None:
                raise FileNotFoundError(f"{bad}: on_nonfinite=skip found no checkpoint to roll back to") from None
            pipeline.reset()  # drop the prefetched batches of the abandoned segment
            position = checkpoint.load_checkpoint(latest, model, optimizer, config, ctx)
            logger.warning("%s: rolled back to %s and skipping that batch (skipped so far: %s)", bad, latest.name,
                           state.skipped)
            state.step, state.evals, state.saved_at = position.step, position.evals, position.step
            # the rolled-back checkpoint predates this skip; the next one records it
            mlperf.event("nonfinite_skip", {"epoch": bad.epoch, "batch": bad.batch})
    step, evals, reached = state.step, state.evals, state.reached
    train_time = state.train_time
    if every is not None and state.saved_at != step:
        save()
    status = "success" if config.training.target_auc is None or reached else "aborted"
    mlperf.end("run_stop", metadata={"status": status})
    samples = step * global_batch
    result: Dict[str, Any] = {
        "steps": step,
        "train_samples": samples,
        "train_seconds": train_time,
        # this process's own steps over its own training time (a resumed run counts only what it trained)
        "samples_per_s": (step - first_step) * global_batch / max(train_time, 1e-9),
        "wall_seconds": time.perf_counter() - start,
        "world_size": ctx.world_size,
        "global_batch": global_batch,
        "learning_rates": {"sparse": optim_cfg.sparse_lr, "dense": optim_cfg.dense_lr},
        "embeddings": config.embeddings.kind,
        # table -> "sharding_type/compute_kernel" the planner chose
        "placement": {table: f"{ps.sharding_type}/{ps.compute_kernel}" for module_plan in model.plan.plan.values()
                      for table, ps in module_plan.items()},  # type: ignore[union-attr]
        "memory": mem.as_dict(),
        "val": evals[-1],
        "evals": evals,
        "target_auc": config.training.target_auc,
        "target_reached": reached,
        "data_skips": loader.skip_report(),
        "skipped_batches": [list(b) for b in state.skipped],  # (epoch, batch) left out after a non-finite loss
    }
    if config.training.final_test:
        result["test"] = _guarded_eval("test")
        mlperf.event("test_accuracy", result["test"]["auc"])
    mlperf.close()
    reporter.finish(result)
    return result


def load_metrics(run_dir: Path) -> Dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


__all__ = ["run_training", "build_sharded_model", "evaluate", "load_metrics"]
