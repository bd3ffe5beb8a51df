"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP), and resuming from them.

A checkpoint is ``RUN_DIR/checkpoints/step_<N>/``:

- DCP files (``*.distcp`` + ``.metadata``): ``{"model": DMP state_dict, "optim": CombinedOptimizer state_dict}``.
  Sharded tables are ``ShardedTensor``s (each rank writes its own shards, row-wise ones included; DCP re-splits
  them on load, so a different world size can load them), replicated parameters (MLPs, MEM-REC's weight table)
  are written once, fused TBE optimizer state is sharded like its table.
- ``rank_<r>.pt``: that rank's RNG states (python, numpy, torch, and CUDA on its current device) as tensors and
  plain data, read with ``torch.load(weights_only=True)``: loading a checkpoint runs no pickled code.
- ``config.yaml``: the resolved configuration of the run that wrote it.
- ``COMPLETE.json``, written last: data position (epoch, global step, steps into the epoch), global batch,
  method's artifact (e.g. the LMA index) path, the evaluations so far, and ``files``: the sha256 of every other
  file of the directory, written by rank 0 once every rank has finished writing. A directory without it is not a
  checkpoint; one whose files differ from it is damaged: loading it is an error naming the file, and
  :func:`latest_checkpoint` passes over it (a warning naming the file) to the newest intact one.

Writes go to ``step_<N>.tmp/`` and are renamed once every rank has finished and the marker is in place, so a
crash mid-save leaves only a ``.tmp`` directory (ignored and replaced later). The last ``keep`` are kept.
Checkpoints are taken only where ``TrainPipelineSparseDist`` is drained (segment boundaries, see
``segment_plan``), so no prefetched batch is lost or trained twice.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from embeddings.integrity import file_sha256
from trainer.config import Config, save_config
from trainer.prepare.run import artifact_path
from trainer.train.distributed import DistContext

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
FORMAT_VERSION = 2  # 2: sha256 of every file ("files"), RNG states loadable with weights_only=True
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainPosition:
    """Where training stands: ``step`` global steps done, ``step_in_epoch`` of them in epoch ``epoch``."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    evals: List[Dict[str, Any]] = field(default_factory=list)  # validation results so far (global, rank-equal)
    skipped: List[List[int]] = field(default_factory=list)  # [epoch, batch] left out after non-finite losses


@dataclass(frozen=True)
class Segment:
    """A run of training steps between two drain points of the pipeline."""

    steps: int
    evaluate: bool  # a periodic validation pass follows
    checkpoint: bool  # a checkpoint follows


def segment_plan(eval_segments: Sequence[int], epoch_start_step: int, checkpoint_every: Optional[int],
                 start_in_epoch: int = 0) -> List[Segment]:
    """Split an epoch's evaluation segments also at global steps that are multiples of ``checkpoint_every``,
    and drop what lies before ``start_in_epoch`` (a resumed epoch). Evaluations stay where a run without
    checkpoints or resumption has them."""
    eval_bounds, acc = set(), 0
    for n in eval_segments:
        acc += n
        eval_bounds.add(acc)
    epoch_steps = acc
    ckpt_bounds = set()
    if checkpoint_every:
        first = -(-(epoch_start_step + 1) // checkpoint_every) * checkpoint_every - epoch_start_step
        ckpt_bounds = set(range(first, epoch_steps + 1, checkpoint_every))
    segments, prev = [], start_in_epoch
    for b in sorted(b for b in eval_bounds | ckpt_bounds if b > start_in_epoch):
        segments.append(Segment(b - prev, b in eval_bounds, b in ckpt_bounds))
        prev = b
    return segments


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints (marker present), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


class CheckpointDamagedError(ValueError):
    """A complete checkpoint whose files are not the ones its marker records (or whose marker is unreadable)."""


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest intact complete checkpoint; damaged newer ones are logged (naming the file) and passed over.
    When every complete checkpoint is damaged, the newest one (loading it is then the error naming the file, and
    a fresh run still refuses to overwrite it)."""
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            verify_checkpoint(path)
            return path
        except (CheckpointDamagedError, FileNotFoundError) as exc:
            logger.warning("passing over a damaged checkpoint: %s", exc)
    return found[-1] if found else None


def _file_checksums(directory: Path) -> Dict[str, str]:
    """sha256 of every file of ``directory`` but the marker (DCP shards, .metadata, rank_*.pt, config.yaml)."""
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MARKER}


# checkpoints this process verified, with the (size, mtime) of each file then: not hashed again unless changed
_VERIFIED: Dict[str, Tuple[Tuple[str, int, int], ...]] = {}


def _file_stats(path: Path, names: Sequence[str]) -> Tuple[Tuple[str, int, int], ...]:
    stats = [(n, (path / n).stat()) for n in [MARKER, *names]]
    return tuple((n, st.st_size, st.st_mtime_ns) for n, st in stats)


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """The marker's metadata, once every file it records has the recorded sha256; else
    :class:`CheckpointDamagedError` naming the file."""
    path = Path(path)
    advice = f"the checkpoint {path} is damaged: resume from the previous checkpoint (delete {path} and resume)"
    try:
        meta = read_metadata(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointDamagedError(f"{path / MARKER} is not valid JSON ({exc}); {advice}") from exc
    except ValueError as exc:
        raise CheckpointDamagedError(f"{exc}; {advice}") from exc
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointDamagedError(f"{path / MARKER} records no sha256 of the checkpoint's files; {advice}")
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise CheckpointDamagedError(f"{path / missing[0]} is missing; {advice}")
    stats = _file_stats(path, sorted(files))
    if _VERIFIED.get(str(path)) == stats:
        return meta
    for name, recorded in sorted(files.items()):
        actual = file_sha256(path / name)
        if actual != recorded:
            raise CheckpointDamagedError(f"{path / name}: sha256 {actual[:16]}... differs from the {recorded[:16]}... "
                                         f"that {MARKER} records; {advice}")
    _VERIFIED[str(path)] = stats
    return meta


def _rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain data (``torch.load(weights_only=True)`` reads them)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _training_state(model: nn.Module, optimizer: Any) -> Dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: Any, position: TrainPosition, config: Config,
                    ctx: DistContext, keep: int) -> Path:
    """Write ``step_<position.step>`` atomically (collective: every rank calls it at the same step)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{position.step}"
    tmp = root / f"step_{position.step}.tmp"
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_training_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rank_{ctx.rank}.pt")
    _barrier()  # every rank's shards and RNG file are written
    if ctx.is_main:
        save_config(config, tmp / "config.yaml")
        meta = {
            "format_version": FORMAT_VERSION, "epoch": position.epoch, "step": position.step,
            "step_in_epoch": position.step_in_epoch, "world_size": ctx.world_size,
            "global_batch": config.data.batch_size * ctx.world_size, "artifact_path": artifact_path(config),
            "evals": position.evals, "skipped_batches": position.skipped, "files": _file_checksums(tmp),
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        logger.info("checkpoint written: %s", final)
    _barrier()
    return final


def read_metadata(path: Path) -> Dict[str, Any]:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
    meta: Dict[str, Any] = json.loads(marker.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def _init_lazy_optimizer_state(optimizer: Any) -> None:
    """Dense optimizers such as Adam create state at their first step; DCP loads in place, so create it now
    with a zero-gradient step (no parameter changes) and drop the gradients again."""
    for _, opt in getattr(optimizer, "optimizers", [("", optimizer)]):
        if not isinstance(opt, KeyedOptimizerWrapper):  # fused TBE optimizers keep their state eagerly
            continue
        params = [p for p in opt.params.values() if p.requires_grad]
        if params and any(p not in opt.state for p in params):
            opt.init_state()
            for p in params:
                p.grad = None


def load_model_state(path: Path, model: nn.Module) -> None:
    """Load only the model part of a checkpoint (any world size: DCP re-splits sharded tables)."""
    verify_checkpoint(path)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, config: Config, ctx: DistContext) -> TrainPosition:
    """Restore model, optimizer and RNG states from ``path``; returns the data position to continue from."""
    meta = verify_checkpoint(path)
    global_batch = config.data.batch_size * ctx.world_size
    if meta["global_batch"] != global_batch:
        raise ValueError(f"{path}: written with global batch {meta['global_batch']}, this run has {global_batch} "
                         "(data.batch_size x world size): the data position would not carry over")
    rng_file = Path(path) / f"rank_{ctx.rank}.pt"
    rng: Optional[Dict[str, Any]] = None
    if rng_file.is_file():  # read first: a file that is refused changes nothing
        try:
            rng = torch.load(rng_file, weights_only=True)  # tensors and plain data only: runs no pickled code
        except pickle.UnpicklingError as exc:
            raise CheckpointDamagedError(f"{rng_file}: not an RNG state of this code, refused ({exc}); resume from "
                                         "the previous checkpoint") from exc
    _init_lazy_optimizer_state(optimizer)
    state = _training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    if rng is not None:
        _set_rng_state(rng)
    else:
        logger.warning("%s has no RNG state for rank %d (written with world size %d); keeping the seeded state",
                       path, ctx.rank, meta["world_size"])
    logger.info("resumed from %s: epoch %d, step %d (%d into the epoch)", path, meta["epoch"], meta["step"],
                meta["step_in_epoch"])
    return TrainPosition(meta["epoch"], meta["step"], meta["step_in_epoch"], list(meta.get("evals", [])),
                         [list(b) for b in meta.get("skipped_batches", [])])


__all__ = ["MARKER", "CheckpointDamagedError", "Segment", "TrainPosition", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_model_state", "read_metadata", "save_checkpoint", "segment_plan",
           "verify_checkpoint"]
