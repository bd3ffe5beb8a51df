"""The epochs of one training run: segments between evaluations and checkpoints, steps through the pipeline,
the rollback past a non-finite loss (``training.on_nonfinite``), guarded data and the end-of-run metrics.

``trainer/train/loop.py`` builds the parts (``RunParts``) and calls ``TrainingRun.train`` then ``finish``; the
run's moving position lives in one ``RunState``, everything is reported through the run's ``Reporter``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from trainer.config import Config
from trainer.data.guard import GuardedBatches
from trainer.data.loader import BatchStream
from trainer.data.records import Batch
from trainer.train import checkpoint
from trainer.train.distributed import DistContext
from trainer.train.evaluate import Evaluator
from trainer.train.reporting import Reporter

logger = logging.getLogger(__name__)

Transform = Callable[[Batch], Batch]
# (config, split, ctx, id transform, batches to skip) -> the split's batches (``loop._batches``)
BatchSource = Callable[[Config, str, DistContext, Transform, int], Iterator[Batch]]


class SplitBatches(Iterator[Batch]):
    """A split's batches through the id transform, the first ``skip`` left out. The stream opens at the first
    ``next``, so an error opening it is raised where the batches are read (inside a ``GuardedBatches``);
    ``bad_row_counts`` are the stream's (none before it opens)."""

    def __init__(self, open_stream: Callable[[], BatchStream], transform: Transform, skip: int = 0) -> None:
        self._open, self._transform, self._skip = open_stream, transform, skip
        self._stream: Optional[BatchStream] = None
        self._rest: Iterator[Batch] = iter(())

    def __next__(self) -> Batch:
        if self._stream is None:
            self._stream = self._open()
            self._rest = itertools.islice(self._stream, self._skip, None)
        return self._transform(next(self._rest))

    @property
    def bad_row_counts(self) -> "collections.Counter[str]":
        return self._stream.bad_row_counts if self._stream is not None else collections.Counter()


def eval_segments(total_steps: int, evals_per_epoch: int) -> List[int]:
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


@dataclass(frozen=True)
class RunParts:
    """What a run trains with, fixed for the run."""

    config: Config
    ctx: DistContext
    run_dir: Path
    model: Any
    optimizer: Any
    pipeline: TrainPipelineSparseDist
    reporter: Reporter
    batches: BatchSource
    transform: Transform
    steps_per_epoch: int
    total_steps: int


@dataclass
class RunState:
    step: int  # batches consumed so far (a batch skipped after a non-finite loss counts as consumed)
    evals: List[Dict[str, Any]]
    skipped: List[Tuple[int, int]]  # (epoch, batch in epoch) left out after a non-finite loss
    saved_at: int  # step of the newest checkpoint of this run (-1: none)
    train_time: float = 0.0
    reached: bool = False

    @classmethod
    def at(cls, position: checkpoint.TrainPosition, saved: bool) -> "RunState":
        skipped = [(int(b[0]), int(b[1])) for b in position.skipped]
        return cls(step=position.step, evals=position.evals, skipped=skipped, saved_at=position.step if saved else -1)


class TrainingRun:
    """Trains from ``position`` to the end of the last epoch or the target AUC; see the module doc."""

    def __init__(self, parts: RunParts, position: checkpoint.TrainPosition, loaded: bool) -> None:
        self.parts = parts
        self.every, self.keep = parts.config.training.checkpoint_every, parts.config.training.keep_checkpoints
        self.global_batch = parts.config.data.batch_size * parts.ctx.world_size
        if parts.config.training.on_nonfinite == "skip" and not loaded:  # a rollback point before the first step
            checkpoint.save_checkpoint(parts.run_dir, parts.model, parts.optimizer, position, parts.config,
                                       parts.ctx, self.keep)
            loaded = True
        self.position, self.first_step = position, position.step
        self.state = RunState.at(position, saved=loaded)
        self.streams: Dict[str, Iterator[Batch]] = {}  # split -> the latest batches made of it
        self.start = time.perf_counter()

    def train(self) -> None:
        """Train to the end (or the target AUC), rolling back past each batch with a non-finite loss."""
        position = self.position
        while True:
            try:
                self._train_from(position)
                return
            except _NonFiniteLoss as bad:
                position = self._roll_back(bad)

    def finish(self, facts: Dict[str, Any]) -> Dict[str, Any]:
        """Last checkpoint, run_stop, the metrics (``facts`` and this run's progress, then the final test),
        handed to the reporter; returns them."""
        cfg, state, reporter = self.parts.config.training, self.state, self.parts.reporter
        if self.every is not None and state.saved_at != state.step:
            self.save()
        reporter.run_stop("success" if cfg.target_auc is None or state.reached else "aborted")
        result = {**facts, **self._progress()}
        if cfg.final_test:
            result["test"] = self.guarded_eval("test")
            reporter.on_test(result["test"])
        reporter.finish(result)
        return result

    def _progress(self) -> Dict[str, Any]:
        state = self.state
        return {
            "steps": state.step,
            "train_samples": state.step * self.global_batch,
            "train_seconds": state.train_time,
            # this process's own steps over its own training time (a resumed run counts only what it trained)
            "samples_per_s": (state.step - self.first_step) * self.global_batch / max(state.train_time, 1e-9),
            "wall_seconds": time.perf_counter() - self.start,
            "val": state.evals[-1],
            "evals": state.evals,
            "target_reached": state.reached,
            "data_skips": self.data_skips(),
            "skipped_batches": [list(b) for b in state.skipped],  # (epoch, batch) left out after a non-finite loss
        }

    def data_skips(self) -> Dict[str, Dict[str, int]]:
        """{split: {reason: rows}} skipped under ``bad_rows: skip`` by the latest stream of each split this run
        made (every rank parses every line, so rank 0's counts cover the whole split)."""
        counts = {split: getattr(batches, "bad_row_counts", None) for split, batches in self.streams.items()}
        return {split: dict(c) for split, c in counts.items() if c}

    def _open(self, split: str, skip: int = 0) -> Iterator[Batch]:
        p = self.parts
        self.streams[split] = batches = p.batches(p.config, split, p.ctx, p.transform, skip)
        return batches

    def _train_from(self, pos: checkpoint.TrainPosition) -> None:
        per_epoch, total = self.parts.steps_per_epoch, self.parts.total_steps
        for epoch in range(pos.epoch, self.parts.config.training.epochs):
            epoch_steps = min(per_epoch, total - epoch * per_epoch)
            if epoch_steps <= 0 or self.state.reached:
                break
            skip = pos.step_in_epoch if epoch == pos.epoch else 0
            if skip < epoch_steps:
                self._epoch(epoch, epoch_steps, skip)

    def _epoch(self, epoch: int, epoch_steps: int, skip: int) -> None:
        """One epoch from its batch ``skip``: segments, each followed by its evaluation and/or checkpoint."""
        reporter = self.parts.reporter
        reporter.epoch_start(epoch)
        train_iter = self._open("train", skip)
        evals = eval_segments(epoch_steps, self.parts.config.training.evals_per_epoch)
        for segment in checkpoint.segment_plan(evals, epoch * self.parts.steps_per_epoch, self.every, skip):
            self._train_segment(epoch, train_iter, segment.steps)
            if self._after_segment(segment):
                break
        reporter.epoch_stop(epoch)

    def _train_segment(self, epoch: int, train_iter: Iterator[Batch], steps: int) -> None:
        """The segment's next ``steps`` batches, those skipped after a non-finite loss left out; stops with a
        checkpoint of what is trained when some rank's data fails."""
        state, epoch_start = self.state, epoch * self.parts.steps_per_epoch
        first = state.step - epoch_start  # batch index in the epoch where this segment starts
        left_out = {batch for e, batch in state.skipped if e == epoch}
        wanted = [first + i for i in range(steps) if first + i not in left_out]
        guard = GuardedBatches(itertools.islice(train_iter, steps), self.parts.ctx.device, "train")
        kept = (b for i, b in enumerate(guard, start=first) if i not in left_out)
        t0 = time.perf_counter()
        self._steps(epoch, wanted, kept)
        state.train_time += time.perf_counter() - t0
        state.step = epoch_start + first + guard.count  # batches consumed (skipped ones included)
        if guard.failed:  # every batch before the bad one is trained: keep that state, then report
            self.save()
            guard.raise_if_failed(f"at train batch {first + guard.count} of epoch {epoch} (checkpoint "
                                  f"written at step {state.step}; fix the data and --resume)")

    def _steps(self, epoch: int, wanted: List[int], batches: Iterator[Batch]) -> None:
        """A training step for each batch index in ``wanted``; raises ``_NonFiniteLoss`` after a NaN/inf loss."""
        epoch_start = epoch * self.parts.steps_per_epoch
        for index in wanted:
            try:
                loss, *_ = self.parts.pipeline.progress(batches)
            except StopIteration:
                break
            self.state.step = epoch_start + index + 1
            if _nonfinite_on_any_rank(loss):  # the update is already applied (fused optimizers)
                raise _NonFiniteLoss(
                    f"non-finite loss at step {self.state.step} (epoch {epoch}, train batch {index} of the epoch, "
                    f"rows from {index * self.global_batch}; this rank's loss {float(loss)})", epoch, index)
            self.parts.reporter.on_step(self.state.step, float(loss))

    def _after_segment(self, segment: checkpoint.Segment) -> bool:
        """The segment's evaluation and checkpoint; whether the target AUC is reached."""
        if segment.evaluate:
            self._validate()
        if segment.checkpoint:  # the pipeline is drained here; after the evaluation so it is recorded
            self.save()
        target = self.parts.config.training.target_auc
        if segment.evaluate and target is not None and self.state.evals[-1]["auc"] >= target:
            self.state.reached = True
        return self.state.reached

    def _validate(self) -> None:
        state, reporter = self.state, self.parts.reporter
        epoch_fraction = state.step / self.parts.steps_per_epoch
        reporter.eval_start(epoch_fraction)
        metrics = self.guarded_eval("val")
        metrics.update(step=state.step, epoch=epoch_fraction)
        state.evals.append(metrics)
        reporter.on_val(state.step, epoch_fraction, metrics)

    def guarded_eval(self, split: str) -> Dict[str, float]:
        """Evaluate ``split``; when some rank's data fails, the training state so far is saved, then reported."""
        p, state = self.parts, self.state
        guard = GuardedBatches(self._open(split), p.ctx.device, split)
        metrics = evaluate(p.pipeline, p.model, guard, p.ctx)
        if guard.failed:  # evaluation changes no parameters
            if state.saved_at != state.step:
                self.save()
            guard.raise_if_failed(f"at {split} batch {guard.count} after training step {state.step} "
                                  f"(checkpoint written at step {state.step})")
        return metrics

    def save(self) -> None:
        """Checkpoint at ``state.step`` (the end of an epoch is recorded as the start of the next one)."""
        p, state = self.parts, self.state
        epoch = state.step // p.steps_per_epoch
        at = checkpoint.TrainPosition(epoch, state.step, state.step - epoch * p.steps_per_epoch, state.evals,
                                      [list(b) for b in state.skipped])
        checkpoint.save_checkpoint(p.run_dir, p.model, p.optimizer, at, p.config, p.ctx, self.keep)
        state.saved_at = state.step

    def _roll_back(self, bad: _NonFiniteLoss) -> checkpoint.TrainPosition:
        """After a non-finite loss: stop, or (``on_nonfinite=skip``) reload the newest checkpoint and leave the
        batch out from there on."""
        p, state, cfg = self.parts, self.state, self.parts.config.training
        if cfg.on_nonfinite != "skip":
            raise FloatingPointError(f"{bad}; no checkpoint written after it") from None
        if len(state.skipped) >= cfg.max_nonfinite_skips:
            raise FloatingPointError(f"{bad}; already skipped {len(state.skipped)} batch(es) "
                                     f"{state.skipped} = training.max_nonfinite_skips: stopping") from None
        state.skipped.append((bad.epoch, bad.batch))
        latest = checkpoint.latest_checkpoint(p.run_dir)
        if latest is None:
            raise FileNotFoundError(f"{bad}: on_nonfinite=skip found no checkpoint to roll back to") from None
        p.pipeline.reset()  # drop the prefetched batches of the abandoned segment
        position = checkpoint.load_checkpoint(latest, p.model, p.optimizer, p.config, p.ctx)
        logger.warning("%s: rolled back to %s and skipping that batch (skipped so far: %s)", bad, latest.name,
                       state.skipped)
        # the rolled-back checkpoint predates this skip; the next one records it
        state.step, state.evals, state.saved_at = position.step, position.evals, position.step
        p.reporter.nonfinite_skip(bad.epoch, bad.batch)
        return position
