"""Rank-0 reporting: one progress bar line (step, loss, samples/s), TensorBoard scalars, metrics.json,
the final summary, and the MLPerf-style events of ``trainer/train/mlperf_log.py`` (the ``Reporter`` owns the
run's ``MLPerfLogger``): the training loop reports through the ``Reporter`` only. Other ranks report nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

from embeddings.types import MemoryReport
from trainer.config import Config, OptimizerConfig
from trainer.train.distributed import DistContext
from trainer.train.mlperf_log import MLPerfLogger

logger = logging.getLogger(__name__)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    def __init__(self, config: Config, ctx: DistContext, run_dir: Path, total_steps: int, memory: MemoryReport) -> None:
        self.config = config
        self.ctx = ctx
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.memory = memory
        self.global_batch = config.data.batch_size * ctx.world_size
        self._bar: Any = None
        self._writer: Any = None
        self._t_last = time.perf_counter()
        self._step_last = 0
        self.mlperf = MLPerfLogger(run_dir / "mlperf.log" if ctx.is_main and config.training.mlperf_log else None)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if config.training.progress_bar:
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)

    def start_run(self, info: Any, optim: OptimizerConfig, steps_per_epoch: int, eval_samples: int) -> None:
        """The run's setup (log line and MLPerf events), then MLPerf's run_start."""
        self.mlperf.event("global_batch_size", self.global_batch)
        self.mlperf.event("opt_base_learning_rate", optim.sparse_lr)
        self.mlperf.event("opt_name", optim.sparse)
        self.log_start(info)
        self.mlperf.event("train_samples", steps_per_epoch * self.global_batch)
        self.mlperf.event("eval_samples", eval_samples)
        self.mlperf.start("run_start")

    def epoch_start(self, epoch: int) -> None:
        self.mlperf.start("epoch_start", metadata={"epoch_num": epoch + 1})

    def epoch_stop(self, epoch: int) -> None:
        self.mlperf.end("epoch_stop", metadata={"epoch_num": epoch + 1})

    def eval_start(self, epoch_fraction: float) -> None:
        self.mlperf.start("eval_start", metadata={"epoch_num": epoch_fraction})

    def on_val(self, step: int, epoch_fraction: float, metrics: Dict[str, float]) -> None:
        """A periodic validation's end (MLPerf eval_stop and eval_accuracy) and its scalars."""
        self.mlperf.end("eval_stop", metadata={"epoch_num": epoch_fraction})
        self.mlperf.event("eval_accuracy", metrics["auc"], metadata={"epoch_num": epoch_fraction})
        self.on_eval("val", step, metrics)

    def on_test(self, metrics: Dict[str, float]) -> None:
        """The final test's MLPerf event (its scalars are written by ``finish``)."""
        self.mlperf.event("test_accuracy", metrics["auc"])

    def nonfinite_skip(self, epoch: int, batch: int) -> None:
        self.mlperf.event("nonfinite_skip", {"epoch": epoch, "batch": batch})

    def run_stop(self, status: str) -> None:
        self.mlperf.end("run_stop", metadata={"status": status})

    def log_start(self, info: Any) -> None:
        if not self.ctx.is_main:
            return
        m = self.memory
        logger.info(
            "training %s tables on %d rank(s) (%s, %s): %d steps of global batch %d; embedding memory %s "
            "(+ %s optimizer state) %s",
            self.config.embeddings.kind, self.ctx.world_size, self.ctx.device.type, self.ctx.backend,
            self.total_steps, self.global_batch, _human_bytes(m.total_bytes), _human_bytes(m.optimizer_state_bytes),
            m.versus_full(),
        )

    def on_step(self, step: int, loss: float) -> None:
        if not self.ctx.is_main or step % self.config.training.log_every and step != self.total_steps:
            return
        now = time.perf_counter()
        rate = (step - self._step_last) * self.global_batch / max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, step
        self._writer.add_scalar("train/loss", loss, step)
        self._writer.add_scalar("train/samples_per_s", rate, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            logger.info("step %d/%d loss %.4f samples/s %.0f", step, self.total_steps, loss, rate)

    def on_eval(self, split: str, step: int, metrics: Dict[str, float]) -> None:
        if not self.ctx.is_main:
            return
        for key, value in metrics.items():
            if key not in ("step", "epoch"):
                self._writer.add_scalar(f"{split}/{key}", value, step)
        text = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("auc", "logloss", "oracle_auc"))
        message = f"eval {split} @ step {step}: {text}"
        if self._bar is not None:
            self._bar.write(message)
        else:
            logger.info(message)

    def finish(self, result: Dict[str, Any]) -> None:
        self.mlperf.close()
        if not self.ctx.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        if "test" in result:
            self.on_eval("test", result["steps"], result["test"])
        self._writer.flush()
        self._writer.close()
        path = self.run_dir / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
        tmp.replace(path)
        print(summary(result), flush=True)


def summary(result: Dict[str, Any]) -> str:
    """The human summary printed at the end of a run (also used by `compactrec compare`)."""
    val = result["val"]
    mem = result["memory"]
    lines = [
        f"== CompactRec run: {result['embeddings']} tables, {result['world_size']} rank(s) ==",
        f"validation AUC      {val['auc']:.4f}   logloss {val['logloss']:.4f}   ({int(val['samples'])} samples)",
    ]
    if "oracle_auc" in val:
        lines.append(f"oracle AUC          {val['oracle_auc']:.4f}   logloss {val['oracle_logloss']:.4f}  (the data's true logit)")
    test: Optional[Dict[str, float]] = result.get("test")
    if test:
        lines.append(f"test AUC            {test['auc']:.4f}   logloss {test['logloss']:.4f}")
    lines += [
        f"throughput          {result['samples_per_s']:,.0f} samples/s ({result['steps']} steps, {result['train_seconds']:.1f} s training)",
        f"embedding bytes     {mem['total_bytes']:,} ({_human_bytes(mem['total_bytes'])}), optimizer state "
        f"{_human_bytes(mem['optimizer_state_bytes'])}; " + (
            f"full tables {_human_bytes(mem['full_table_bytes'])} -> {mem['compression_ratio']:.1f}x smaller"
            if mem.get("compression_ratio") is not None else "full tables' sizes unknown (no compression ratio)"),
    ]
    skips = result.get("data_skips") or {}
    if skips:
        lines.append(f"skipped bad rows    {json.dumps(skips)}")
    return "\n".join(lines)
