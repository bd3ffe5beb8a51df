"""What ``compactrec train`` checks before any worker starts, and the training-length check workers share.

``preflight(config, ...)`` runs in the launching process (``compactrec train --nproc``): the data directory and
the table sizes (``trainer.prepare.dataset_info.dataset_info``), every file of the training and evaluation splits (headers
and first lines, ``trainer.data.check``), what ``compactrec prepare`` builds (the LMA index: present, and built
from this data with these options), the embedding module and its default placement built on the ``meta``
device (option errors such as a chunk size that TBE cannot shard), and, where counting rows is cheap
(npy/npz), that training has steps at all. A problem is one error naming the file, key or command, raised
before torchx starts a job; warnings (e.g. a tiny run) are returned.

``train_steps`` is the one computation of the training length: workers use it too, so a run whose data gives
only a handful of steps warns with the numbers and the fix wherever it is launched from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

from trainer.config import Config
from trainer.data import loader
from trainer.data.check import check_split_files

if TYPE_CHECKING:
    from trainer.prepare.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

#: Fewer training steps than this, from the data alone (not from a cap the user set), earns a warning.
MIN_TRAIN_STEPS = 100


@dataclass(frozen=True)
class StepBudget:
    """Steps per epoch and in total; ``warning`` when the data gives too few steps to learn from."""

    steps_per_epoch: int
    total: int
    warning: Optional[str] = None


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def train_steps(config: Config, world_size: int, rows: int) -> StepBudget:
    """Steps of a run over ``rows`` training rows on ``world_size`` ranks; raises when there are none."""
    data, training = config.data, config.training
    global_batch = data.batch_size * world_size
    from_data = rows // global_batch
    steps_per_epoch = from_data if data.limit_train_batches is None else min(from_data, data.limit_train_batches)
    total = steps_per_epoch * training.epochs
    if training.max_steps is not None:
        total = min(total, training.max_steps)
    if total == 0:
        raise ValueError(f"no training batches: {rows:,} train rows < global batch {global_batch:,} "
                         f"(data.batch_size={data.batch_size:,} x {world_size} rank(s)); lower data.batch_size")
    warning = None
    if from_data * training.epochs < MIN_TRAIN_STEPS:
        suggested = _power_of_two_at_most(rows * training.epochs // (world_size * MIN_TRAIN_STEPS))
        fix = (f"lower data.batch_size (data.batch_size={suggested:,} gives "
               f"{rows // (suggested * world_size) * training.epochs:,} steps)" if suggested < data.batch_size
               else "use more training data")
        warning = (f"this run trains only {from_data * training.epochs:,} steps: {rows:,} training rows / global "
                   f"batch {global_batch:,} (data.batch_size={data.batch_size:,} x {world_size} rank(s)) = "
                   f"{from_data:,} step(s) per epoch x {training.epochs} epoch(s), fewer than {MIN_TRAIN_STEPS}; "
                   f"too few for the model to learn or for its metrics to mean much: {fix}, or raise "
                   "training.epochs")
    return StepBudget(steps_per_epoch, total, warning)


def check_model(config: Config, info: DatasetInfo, world_size: int, local_world_size: int) -> None:
    """Build the embedding module on ``meta`` (no memory, no data read) and its default placement, from the
    dataset's names, sizes and id counts as ``dataset_info`` loaded them."""
    import torch

    from embeddings.types import TopologyInfo
    from trainer.train.model import build_sparse_arch, sparse_context

    arch = build_sparse_arch(config, sparse_context(config, info.feature_names, info.num_embeddings_per_feature,
                                                    torch.device("meta"), info.pooling_factors, info.id_counts))
    arch.spec.default_constraints(arch.module, arch.options, TopologyInfo(world_size, local_world_size, "cpu"))


def preflight(config: Config, world_size: int, local_world_size: int, rebuild_command: str) -> List[str]:
    """Everything checkable before launch (module docstring); returns warnings, raises on the first problem."""
    from trainer.prepare.dataset_info import dataset_info
    from trainer.prepare.run import check_prepared

    info = dataset_info(config)  # the data directory exists; table sizes; the id counts where the config needs them
    check_split_files(config.data, "train")
    check_split_files(config.data, "val")  # val and test are halves of the evaluation day
    check_prepared(config, rebuild_command)
    check_model(config, info, world_size, local_world_size)
    warnings: List[str] = []
    if config.data.format != "tsv":  # counting TSV rows is a pass over the data: the workers do it
        budget = train_steps(config, world_size, loader.count_rows(config.data, "train"))
        if budget.warning is not None:
            warnings.append(budget.warning)
    return warnings
