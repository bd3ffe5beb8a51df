"""``generate``: write a seeded synthetic Criteo-like click log (TSV + TorchRec npy + oracle logits).

Layout of ``out_dir`` (manifest written last):

- ``manifest.json``: params, sizes, field groups, conventions, CTR per day, oracle metrics on the eval day
- ``day_{i}``: TSV ``label, I1..I13, C1..C26``; categorical = ``%08x`` of ``token_of(field, id)``, missing = ""
- ``day_{i}_dense.npy`` float32 (N, 13), ``day_{i}_sparse.npy`` int32 (N, 26), ``day_{i}_labels.npy`` int32
  (N, 1), ``day_{i}_oracle_logits.npy`` float32 (N,)

Rows are simulated in blocks of ``BLOCK_ROWS`` with one random stream per (seed, day, block), so the data
do not depend on ``chunk_rows``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic_config import SyntheticConfig
from . import terabyte
from .field_layout import CAT_FIELDS, DENSE_FIELDS, build_layout, field_groups
from .world import World
from .writers import DayWriter

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # on-disk layout
GENERATOR_VERSION = 2  # bump whenever the same params would give different data
BLOCK_ROWS = 32_768  # rows per random stream
CALIBRATION_ROWS = 65_536  # rows drawn (spread over all days) to fit the logit scale and intercept


def _rng(cfg: SyntheticConfig, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, *tags]))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibrate(world: World, cfg: SyntheticConfig) -> tuple[float, float]:
    """(scale, intercept) so that the oracle logit has std ``oracle_logit_std`` and mean CTR ``target_ctr``."""
    per_day = max(1, CALIBRATION_ROWS // cfg.num_days)
    raw = np.concatenate([world.sample_hidden(_rng(cfg, 0xCA1B, d), d, per_day).raw for d in range(cfg.num_days)])
    std = float(raw.std())
    scale = cfg.oracle_logit_std / std if std > 0 else 1.0
    x = scale * (raw - raw.mean())
    lo, hi = -30.0, 30.0
    for _ in range(100):  # mean sigmoid is increasing in the intercept: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigmoid(x + mid).mean() < cfg.target_ctr else (lo, mid)
    return scale, 0.5 * (lo + hi) - scale * float(raw.mean())


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    y = labels.reshape(-1).astype(bool)
    s = scores.reshape(-1).astype(np.float64)
    order = np.argsort(s, kind="stable")
    ss = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    bounds = np.flatnonzero(np.diff(ss)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [s.size]])
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    npos = int(y.sum())
    nneg = y.size - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits."""
    y = labels.reshape(-1).astype(np.float64)
    z = logits.reshape(-1).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _manifest_path(out: Path) -> Path:
    return out / "manifest.json"


def _check_existing(out: Path, cfg: SyntheticConfig, overwrite: bool) -> dict[str, Any] | None:
    """Return the existing manifest if it matches ``cfg``; raise if it differs and ``overwrite`` is False."""
    path = _manifest_path(out)
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        old_params = SyntheticConfig.from_params(old["params"]).data_params()
    except (ValueError, KeyError, TypeError) as exc:
        old, old_params = None, {"unreadable": str(exc)}
    versions = (FORMAT_VERSION, GENERATOR_VERSION)
    if old is not None and (old.get("format_version"), old.get("generator_version")) == versions:
        same = old_params == cfg.data_params()
    else:
        same, old_params = False, {**old_params, "versions": "differ"}
    if same:
        log.info("synthetic data in %s already complete with identical params; nothing to do", out)
        return old
    if not overwrite:
        diff = sorted(k for k in cfg.data_params() if old_params.get(k) != cfg.data_params()[k])
        raise FileExistsError(
            f"{out} holds a synthetic dataset generated with different params (differing: {diff}); "
            "pass overwrite=True to replace it"
        )
    path.unlink()
    for p in out.glob("day_*"):  # only our own files
        p.unlink()
    return None


def generate(cfg: SyntheticConfig, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Generate the dataset described by ``cfg`` into ``out_dir`` and return its manifest.

    Idempotent: a directory with a complete manifest of identical params is left as is. A complete dataset
    with other params raises FileExistsError unless ``overwrite`` is True.
    """
    out = Path(out_dir)
    existing = _check_existing(out, cfg, overwrite)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layout = build_layout(cfg)
    world = World(cfg, layout)
    scale, intercept = calibrate(world, cfg)
    log.info("world built, calibrated in %.1fs (scale %.3f, bias %.3f)", time.perf_counter() - t0, scale, intercept)
    n = cfg.rows_per_day
    blocks_per_chunk = max(1, cfg.chunk_rows // BLOCK_ROWS)
    ctr, dense_min, files = [], [], []
    columns = terabyte.column_order(cfg.table_sizes)  # file column j shows generator field columns[j]
    eval_labels: list[np.ndarray] = []
    eval_logits: list[np.ndarray] = []
    for day in range(cfg.num_days):
        writer = DayWriter(out, day, n, cfg.write_tsv, cfg.write_npy)
        noise_used: dict[str, int] = {}
        clicks = 0
        n_blocks = math.ceil(n / BLOCK_ROWS)
        for c0 in range(0, n_blocks, blocks_per_chunk):
            parts = []
            for b in range(c0, min(c0 + blocks_per_chunk, n_blocks)):
                rows = min(BLOCK_ROWS, n - b * BLOCK_ROWS)
                rng = _rng(cfg, 0xDA7A, day, b)
                hid = world.sample_hidden(rng, day, rows)
                sparse = world.emit(hid, rng, day, noise_used)[:, columns]
                dense, dmiss = hid.dense, hid.dmiss
                logit = (scale * hid.raw + intercept).astype(np.float32)
                label = (rng.random(rows) < sigmoid(logit.astype(np.float64))).astype(np.int32)
                parts.append((label, dense, dmiss, sparse, logit))
            label, dense, dmiss, sparse, logit = (np.concatenate(x) for x in zip(*parts))
            writer.write(label, dense, dmiss, sparse, logit)
            clicks += int(label.sum())
            if day == cfg.num_days - 1:
                eval_labels.append(label)
                eval_logits.append(logit)
        files += writer.close(cfg.chunk_rows)
        dense_min.append(int(writer.dense_min or 0))
        ctr.append(clicks / n)
        log.info("day %d/%d written (ctr %.4f, %.1fs)", day + 1, cfg.num_days, ctr[-1], time.perf_counter() - t0)
    y, z = np.concatenate(eval_labels), np.concatenate(eval_logits)
    half = (n + 1) // 2
    oracle = {
        "eval_day": cfg.num_days - 1,
        "val_rows": half,
        "test_rows": n - half,
        "val_auc": auc(y[:half], z[:half]),
        "val_logloss": logloss(y[:half], z[:half]),
        "test_auc": auc(y[half:], z[half:]) if n > half else float("nan"),
        "test_logloss": logloss(y[half:], z[half:]) if n > half else float("nan"),
        "eval_day_auc": auc(y, z),
        "eval_day_logloss": logloss(y, z),
        "logit_std": float(z.std()),
    }
    manifest = _build_manifest(cfg, layout, scale, intercept, ctr, dense_min, sorted(files), oracle)
    manifest = terabyte.finish(out, manifest, cfg.table_sizes, cfg.write_multi_hot)
    tmp = _manifest_path(out).with_suffix(".json.partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    os.replace(tmp, _manifest_path(out))
    log.info(
        "synthetic dataset in %s: %d rows, oracle val AUC %.4f, %.1fs",
        out, cfg.total_rows, oracle["val_auc"], time.perf_counter() - t0,
    )
    return manifest


def _build_manifest(
    cfg: SyntheticConfig, layout: Any, scale: float, intercept: float, ctr: list[float],
    dense_min: list[int], files: list[str], oracle: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The manifest dict (see module docstring)."""
    return {
        "format_version": FORMAT_VERSION,
        "generator": "trainer.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "params": cfg.to_params(),
        "seed": cfg.seed,
        "num_days": cfg.num_days,
        "rows_per_day": [cfg.rows_per_day] * cfg.num_days,
        "total_rows": cfg.total_rows,
        "dense_fields": list(DENSE_FIELDS),
        "cat_fields": list(CAT_FIELDS),
        "num_embeddings_per_feature": layout.num_embeddings(),
        "field_groups": field_groups(),
        "taxonomy_sizes": layout.level_sizes,
        "noise_token_rate_per_entity": layout.noise_rate,
        "noise_ids_per_day": layout.noise_per_day,
        "conventions": {
            "tsv": "label, I1..I13, C1..C26 tab-separated, no header, missing = empty field",
            "categorical_token": "%08x of token_of(field, contiguous_id); token_of(f, 0) == 0",
            "missing_categorical": (
                "contiguous id 0 in day_{i}_sparse.npy (reserved in every field); empty in the TSV, which "
                "TorchRec's tsv_to_npys reads as int('' or '0', 16) == 0 == token_of(f, 0)"
            ),
            "contiguous_ids": "0..num_embeddings_per_feature[f]-1 per field (0 = missing), not shifted by 2",
            "dense_transform": (
                "float32 log(x - m + 2) with missing x -> 0 first and m = min over all 13 integer columns of "
                "the whole day file (TorchRec tsv_to_npys); m per day in dense_min_per_day"
            ),
            "split": "train = days 0..num_days-2; eval day: first ceil(N/2) rows = val, the rest = test",
            "oracle_logits": "true logit of P(click) per row; label ~ Bernoulli(sigmoid(logit))",
        },
        "dense_min_per_day": dense_min,
        "ctr_per_day": ctr,
        "calibration": {"logit_scale": scale, "intercept": intercept},
        "oracle": oracle,
        "files": files,
    }
