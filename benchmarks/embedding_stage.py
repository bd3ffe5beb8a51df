"""Embedding-stage benchmark (issues 6, 13): full vs memrec vs lma vs robe/hash/qr, single process, CPU.

Every method is built through the registry exactly as the trainer builds it (``registry.get(kind).build``)
on ``meta``, its fused sparse optimizer is attached with ``trainer.train.optim.apply_sparse_optimizer`` (fused
SGD in fbgemm's TBE backward, as in training) and it is wrapped by TorchRec's ``DistributedModelParallel``
with world size 1 (gloo, CPU) and the method's own sharders/constraints - i.e. the same fbgemm CPU TBE
kernels and remapping code the trainer runs, without any communication cost. Variants and modifiers
(``memrec_fused+weighted``, ``+rowwise``, ``+dp``): ``benchmarks/stage_methods.py``.

Timed per batch (median, p10, p90 over ``--repeats``, after ``--warmup`` untimed steps that also touch the
tables), methods interleaved round-robin (one step each per round):
- ``fwd``: forward under ``torch.no_grad()`` (inference lookup, including hashing/remapping);
- ``train``: forward + backward of ``(out * g).sum()`` + the fused SGD update of the touched rows + a dense SGD
  step of the parameters not updated in backward (MEM-REC's weight table, data-parallel tables).

Also measured in the same run: a STREAM-style copy bandwidth, and for each method the bytes it must move per
batch (``stage_methods.bytes_touched``), so every time is also a fraction of the bandwidth bound.

Results are written after every (shape, ids, batch) cell; ``--resume`` keeps the cells already in ``--out``.json
(same arguments) and runs only the rest.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/embedding_stage.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/embedding_stage.py --threads 1 --no-ddp --shapes tb --tb-scale 16 \
        --batch-sizes 2048,8192 --methods full,memrec_fused,memrec_fused+weighted+rowwise --out /tmp/stage
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bench_common import machine_info, stream_copy_gbs, summary, time_interleaved, time_it, touch
from report_common import result_header
from embeddings.types import SparseArchContext
from stage_methods import Built, base_method, build_dmp, build_lma_index, bytes_touched, method_options, variant_names
from stage_report import markdown, plot_speedup
from trainer.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMPARED_ARGS = ("shapes", "tb_scale", "tb_dim", "kaggle_scale", "kaggle_dim", "methods", "dists", "batch_sizes",
                 "repeats", "warmup", "distinct_batches", "lr", "interleave", "no_ddp", "threads", "count_ids")


def preset_rows(preset: str) -> List[int]:
    """The table sizes a preset trains with (one source of truth: the config files)."""
    return list(load_config(CONFIGS / preset).embeddings.num_embeddings_per_feature or [])


KAGGLE_ROWS = preset_rows("criteo_kaggle.yaml")
TB_ROWS = preset_rows("criteo_tb_dlrmv2.yaml")  # MLPerf DLRMv2 row counts


# ---------------------------------------------------------------------------------------------- data
def scaled_rows(rows: Sequence[int], scale: int) -> List[int]:
    return [max(1, math.ceil(r / scale)) for r in rows]


def sample_ids(rng: np.random.Generator, n: int, size: int, dist_name: str) -> np.ndarray:
    """``size`` ids in ``[0, n)``: uniform, or Zipf-like (P(rank r) ~ 1/r, via log-uniform ranks) with the hot
    ranks scattered over the table by a multiplicative permutation (hot rows are not adjacent)."""
    if dist_name == "uniform" or n == 1:
        return rng.integers(0, n, size=size, dtype=np.int64)
    ranks = np.floor(np.exp(rng.random(size) * math.log(n + 1.0))).astype(np.int64) - 1
    ranks = np.clip(ranks, 0, n - 1)
    return (ranks * 2654435761) % n


def make_kjt(rng: np.random.Generator, names: Sequence[str], rows: Sequence[int], batch: int,
             dist_name: str) -> KeyedJaggedTensor:
    values = np.concatenate([sample_ids(rng, n, batch, dist_name) for n in rows])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(names), values=torch.from_numpy(values),
        lengths=torch.ones(len(names) * batch, dtype=torch.int32))


def id_counts(names: Sequence[str], rows: Sequence[int], dist_name: str, per_feature: int) -> Any:
    """Id frequencies of ``per_feature`` ids per feature drawn from the benchmark's id law (another seed than the
    timed batches): what ``compactrec prepare`` would count on training data of that law, for hot rows."""
    from embeddings.id_counts import FrequencyCounter

    rng = np.random.default_rng(7)
    counter = FrequencyCounter(len(names))
    for f, n in enumerate(rows):
        counter.add(f, sample_ids(rng, n, per_feature, dist_name))
    return counter.result(list(names))


# ------------------------------------------------------------------------------------------ measures
def step_fns(built: Built, no_ddp: bool, kjts: Sequence[KeyedJaggedTensor],
             grads: torch.Tensor) -> Dict[str, Callable[[int], None]]:
    module = built.dmp.module if no_ddp else built.dmp
    dense = built.dense_optimizer

    def fwd(i: int) -> None:
        with torch.no_grad():
            module(kjts[i % len(kjts)])

    def train(i: int) -> None:
        out = module(kjts[i % len(kjts)])
        (out * grads).sum().backward()
        if dense is not None:
            dense.step()
            dense.zero_grad(set_to_none=True)

    return {"fwd": fwd, "train": train}


def _load_previous(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    path = Path(args.out).with_suffix(".json")
    if not args.resume or not path.exists():
        return None
    previous = json.loads(path.read_text())
    for key in COMPARED_ARGS:
        if previous["args"].get(key) != vars(args).get(key):
            raise ValueError(f"--resume: {path} was run with {key}={previous['args'].get(key)!r}, not "
                             f"{vars(args).get(key)!r}; use another --out or the same arguments")
    return previous


def _save(results: Dict[str, Any], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["header"] = result_header()
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(results))


def _ratios(results: Dict[str, Any]) -> None:
    for rec in results["runs"]:
        ref = next((r for r in results["runs"] if r["method"] == "full" and r["shape"] == rec["shape"]
                    and r["dist"] == rec["dist"] and r["batch"] == rec["batch"]), None)
        if ref is not None:
            rec["speedup_vs_full"] = {k: ref[k]["median_ms"] / rec[k]["median_ms"] for k in ("fwd", "train")}


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    results = _load_previous(args) or {
        "machine": machine_info(), "args": vars(args), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": [], "stream": stream_copy_gbs(args.stream_mib, args.stream_repeats)}
    done = {(r["shape"], r["dist"], r["batch"]) for r in results["runs"]}
    print(f"STREAM copy: {results['stream']['median_gbs']:.2f} GB/s (median); {len(done)} cells already done",
          flush=True)
    bw = results["stream"]["median_gbs"] * 1e9
    tmpdir = Path(tempfile.mkdtemp(prefix="embbench_"))
    for shape in args.shapes:
        base, scale, dim = (TB_ROWS, args.tb_scale, args.tb_dim) if shape == "tb" else \
            (KAGGLE_ROWS, args.kaggle_scale, args.kaggle_dim)
        rows = scaled_rows(base, scale)
        names = [f"cat_{i}" for i in range(len(rows))]
        ctx = SparseArchContext(names, rows, dim, torch.device("meta"))
        full_bytes = sum(rows) * dim * 4
        for dist_name in args.dists:
            todo = [b for b in args.batch_sizes if (shape, dist_name, b) not in done]
            if not todo:
                continue
            print(f"== {shape} 1/{scale} ({sum(rows):,} rows x {dim} = {full_bytes/2**30:.2f} GiB), {dist_name} ids",
                  flush=True)
            lma_index = None
            if any(base_method(m) == "lma" for m in args.methods):
                lma_index = str(tmpdir / f"lma_{shape}_{dist_name}.npz")
                build_lma_index(Path(lma_index), names, rows, dist_name, args.lma_sample_rows, sample_ids)
            rng = np.random.default_rng(123)
            batches = {b: [make_kjt(rng, names, rows, b, dist_name) for _ in range(args.distinct_batches)]
                       for b in args.batch_sizes}
            if any("+hot" in m for m in args.methods):
                ctx = dataclasses.replace(ctx, id_counts=id_counts(names, rows, dist_name, args.count_ids))
            built: Dict[str, Tuple[Built, str, Dict[str, Any], float, int]] = {}
            for method in args.methods:
                kind, opts = method_options(method, shape, dim, lma_index)
                t = time.perf_counter()
                b = build_dmp(method, opts, ctx, lr=args.lr, kind=kind)
                index_values = 0
                if base_method(method) == "lma":
                    from embeddings.lma_index import read_header
                    index_values = read_header(lma_index).values_covered
                touch(b.dmp)
                built[method] = (b, kind, opts, time.perf_counter() - t, index_values)
            for batch in todo:
                kjts = batches[batch]
                grads = torch.randn(batch, len(names) * dim) * 1e-3
                steps = {m: step_fns(built[m][0], args.no_ddp, kjts, grads) for m in args.methods}
                load = os.getloadavg()
                times = time_interleaved(steps, args.warmup, args.repeats) if args.interleave else \
                    {m: {ph: time_it(fn, args.warmup, args.repeats) for ph, fn in steps[m].items()} for m in steps}
                for method in args.methods:
                    b, kind, opts, build_s, index_values = built[method]
                    by = bytes_touched(method, opts, batch * len(names), dim, index_values)
                    rec = {"shape": shape, "scale": scale, "dim": dim, "dist": dist_name, "method": method,
                           "kind": kind, "options": {k: v for k, v in opts.items() if k != "index_path"},
                           "placement": b.placement, "batch": batch, "build_s": build_s,
                           "memory_bytes": b.memory.total_bytes, "full_table_bytes": full_bytes,
                           "compression": full_bytes / max(1, b.memory.total_bytes),
                           "fwd": summary(times[method]["fwd"]), "train": summary(times[method]["train"]),
                           "bytes": by, "loadavg": load, "loadavg_after": os.getloadavg()}
                    for k in ("fwd", "train"):
                        rec[k]["bw_bound_ms"] = by[k] / bw * 1e3
                        rec[k]["frac_of_bw"] = rec[k]["bw_bound_ms"] / rec[k]["median_ms"]
                    results["runs"].append(rec)
                    print(f"   {dist_name:7s} {method:30s} B={batch:5d}  fwd {rec['fwd']['median_ms']:8.2f} ms "
                          f"[{rec['fwd']['p10_ms']:.2f}, {rec['fwd']['p90_ms']:.2f}]  train "
                          f"{rec['train']['median_ms']:8.2f} ms [{rec['train']['p10_ms']:.2f}, "
                          f"{rec['train']['p90_ms']:.2f}]  load {load[0]:.1f}", flush=True)
                _ratios(results)
                results["loadavg_at_end"] = os.getloadavg()
                _save(results, args)
            del built
    return results


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--shapes", type=csv, default=["tb", "kaggle"], help="tb,kaggle")
    p.add_argument("--tb-scale", type=int, default=64, help="CriteoTB table rows divided by this")
    p.add_argument("--tb-dim", type=int, default=128)
    p.add_argument("--kaggle-scale", type=int, default=4, help="Kaggle table rows divided by this")
    p.add_argument("--kaggle-dim", type=int, default=16)
    p.add_argument("--methods", type=csv, default=["full", "memrec", "memrec_k2", "lma", "robe", "hash", "qr"])
    p.add_argument("--dists", type=csv, default=["zipf", "uniform"])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--distinct-batches", type=int, default=4)
    p.add_argument("--lma-sample-rows", type=int, default=125_000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--stream-mib", type=int, default=512)
    p.add_argument("--stream-repeats", type=int, default=10)
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time each method's whole series in turn (default: round-robin over methods per step)")
    p.add_argument("--no-ddp", action="store_true",
                   help="time dmp.module (the sharded modules) instead of the DMP wrapper: skips the DDP wrapper "
                        "around data-parallel tables (MEM-REC's weight table), which clones the [B, F*dim] output "
                        "(in training it only clones the logits)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 keeps timings stable when another job "
                        "holds one of a 2-core machine's cores (2-thread OpenMP regions then stall on the busy core)")
    p.add_argument("--out", default="benchmarks/results/embedding_stage")
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
    p.add_argument("--plot-from", default=None, help="only redraw --plot from this results JSON")
    p.add_argument("--plot", default=None, help="write the speedup plot here (e.g. docs/img/embedding_speedup.png)")
    p.add_argument("--count-ids", type=int, default=200_000,
                   help="ids per feature counted for +hot variants (hot rows = each feature's most frequent)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (shape, ids, batch) cells already in --out.json (same arguments) and run the rest")
    args = p.parse_args(argv)
    variant_names(args.methods)
    if args.quick:
        args.shapes, args.tb_scale, args.tb_dim = ["tb"], 1024, 64
        args.batch_sizes, args.repeats, args.warmup, args.dists = [512], 5, 1, ["zipf"]
        args.lma_sample_rows, args.stream_mib, args.stream_repeats = 10_000, 64, 3
        if args.out == "benchmarks/results/embedding_stage":
            args.out = "benchmarks/results/embedding_stage_quick"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)
    args = parse(argv)
    if args.plot_from:
        plot_speedup(json.loads(Path(args.plot_from).read_text()), Path(args.plot or "docs/img/embedding_speedup.png"))
        return
    results = run(args)
    _save(results, args)
    print(f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}")
    if args.plot:
        plot_speedup(results, Path(args.plot))


if __name__ == "__main__":
    main()
