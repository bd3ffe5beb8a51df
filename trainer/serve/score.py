"""``compactrec score ARTIFACT --data DIR``: an inference artifact over a split of any format the trainer reads.

ARTIFACT is an eager artifact (``trainer.serve.artifact.load``), a ``--format pt2`` torch.export program
(``trainer.serve.pt2.load_program``, recognised by its archive) or a ``--format aoti`` AOTInductor package
(``trainer.serve.aoti.load_package``, recognised first: it is a torch.export-style archive too); each carries the
config the defaults come from.

The data section of the artifact's own config is the starting point (so the defaults are the data the model
was trained on); ``--data``, ``--format`` and ``data.*=value`` overrides replace parts of it, checked as strictly
as a training config. ``--split`` is ``val`` or ``test`` (the halves of ``data.eval_day``) or ``day`` (all of
it); ``data.eval_day=N`` scores another day (``train_days`` is not read). Rows are read by the trainer's readers (``trainer.data.loader``: raw TSV,
TorchRec npy, MLPerf multi-hot npz; bad rows handled by ``data.bad_rows``), one process, in order, each row
scored exactly once. Prints and returns AUC and logloss over the labelled rows (exact, every row), the oracle
metrics when the data carries the hidden true logit, and throughput: samples/s of the whole pass and of the
model alone. ``--predictions FILE.npy`` writes the logits (float32, split order).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from trainer.data import loader
from trainer.data.data_config import DataConfig
from trainer.train.evaluate import Evaluator
from trainer.serve.aoti import PackageModel, is_package, load_package
from trainer.serve.artifact import InferenceModel, load
from trainer.serve.pt2 import ProgramModel, is_program, load_program
from trainer.strict import ConfigError, from_dict, to_dict

logger = logging.getLogger(__name__)


Scorable = Union[InferenceModel, ProgramModel, PackageModel]  # eager artifact, pt2 program, aoti package: one interface


def data_config(model: Scorable, path: Optional[str], fmt: Optional[str], batch_size: Optional[int],
                overrides: List[str], source: str) -> DataConfig:
    """The artifact's data section with ``path``/``format``/``eval_batch_size`` and ``data.*`` overrides."""
    from trainer.config import parse_override

    values: Dict[str, Any] = dict(model.metadata["config"]["data"])
    if path is not None:
        values["path"] = path
    if fmt is not None:
        values["format"] = fmt
        if fmt != "tsv":
            values["kaggle_file"] = None
            values["tsv_has_label"] = True
    if batch_size is not None:
        values["eval_batch_size"] = batch_size
    for text in overrides:
        parsed = parse_override(text)
        if set(parsed) != {"data"}:
            raise ConfigError(f"score override {text!r}: only data.* keys apply to scoring")
        values.update(parsed["data"])
    day = values.get("eval_day")
    if isinstance(day, int) and isinstance(values.get("train_days"), list) and day in values["train_days"]:
        values["train_days"] = [d for d in values["train_days"] if d != day] or [day + 1]  # not read; keep it valid
    return from_dict(DataConfig, values, source=source, prefix="data")


SCORE_SPLITS = ("val", "test", "day")


def score(model: Scorable, cfg: DataConfig, split: str = "val", progress: Optional[bool] = None,
          predictions: Optional[Path] = None) -> Dict[str, Any]:
    """Score ``split`` of ``cfg`` with ``model`` (one process); metrics and throughput."""
    from tqdm import tqdm

    if split not in SCORE_SPLITS:
        raise ValueError(f"--split {split!r} must be one of {list(SCORE_SPLITS)}")
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    halves = ["val", "test"] if split == "day" else [split]
    batches = sum(math.ceil(loader.count_rows(cfg, h) / cfg.eval_batch_size) for h in halves)
    if cfg.limit_eval_batches is not None:
        batches = min(batches, cfg.limit_eval_batches * len(halves))
    evaluator = Evaluator(device)
    logits_out: List[np.ndarray] = []
    labelled = scored = 0
    model_seconds = 0.0
    start = time.perf_counter()
    stream = (batch for h in halves for batch in loader.make_batches(cfg, h, 0, 1))  # eval: every row once
    disable = None if progress is None else not progress  # None: tqdm shows a bar only on a terminal
    with torch.inference_mode(), tqdm(total=batches, unit="batch", disable=disable, desc=f"scoring {split}") as bar:
        for batch in stream:
            batch = batch.to(device)
            t = time.perf_counter()
            logits = model(batch.dense_features, batch.sparse_features)
            model_seconds += time.perf_counter() - t
            valid = batch.valid if batch.valid is not None else torch.ones_like(logits, dtype=torch.bool)
            labels = batch.labels.float()
            has_label = valid & (labels >= 0)
            scored += int(valid.sum())
            labelled += int(has_label.sum())
            oracle = batch.oracle_logits if batch.oracle_logits is not None else torch.full_like(logits, float("nan"))
            if bool(has_label.any()):
                evaluator.update((torch.zeros(()), logits, labels, has_label, oracle))
            if predictions is not None:
                logits_out.append(logits[valid].float().cpu().numpy())
            bar.update(1)
    seconds = time.perf_counter() - start
    result: Dict[str, Any] = {"split": split, "rows": scored, "labelled_rows": labelled, "seconds": seconds,
                              "samples_per_s": scored / max(seconds, 1e-9),
                              "model_samples_per_s": scored / max(model_seconds, 1e-9),
                              "precision": model.metadata["precision"], "embeddings": model.metadata["embeddings"],
                              "threads": torch.get_num_threads()}
    if labelled:
        result.update(evaluator.compute())
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        np.save(predictions, np.concatenate(logits_out) if logits_out else np.empty(0, np.float32))
        result["predictions"] = str(predictions)
    return result


def format_result(result: Dict[str, Any], artifact: str, data: str) -> str:
    head = (f"{artifact} ({result['embeddings']}, {result['precision']} tables) on {result['split']} of {data}: "
            f"{result['rows']:,} rows in {result['seconds']:.2f} s, {result['samples_per_s']:,.0f} samples/s "
            f"(model alone {result['model_samples_per_s']:,.0f} samples/s, {result['threads']} thread(s))")
    if "auc" not in result:
        return head + "\nno labelled rows: AUC and logloss not computed"
    line = f"\nAUC {result['auc']:.6f}  logloss {result['logloss']:.6f}  ({result['labelled_rows']:,} labelled rows)"
    if "oracle_auc" in result:
        line += f"; oracle AUC {result['oracle_auc']:.6f} logloss {result['oracle_logloss']:.6f}"
    return head + line


def run_score(artifact: str, data: Optional[str], fmt: Optional[str], split: str, batch_size: Optional[int],
              overrides: List[str], threads: Optional[int], progress: Optional[bool],
              predictions: Optional[str]) -> Dict[str, Any]:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    model: Scorable = (load_package(artifact) if is_package(artifact) else
                       load_program(artifact) if is_program(artifact) else load(artifact))
    cfg = data_config(model, data, fmt, batch_size, overrides, source=f"score {artifact}")
    result = score(model, cfg, split, progress, Path(predictions) if predictions else None)
    result["data"] = to_dict(cfg)
    return result


__all__ = ["data_config", "format_result", "run_score", "score"]
