"""End-to-end training benchmark (issue 6): the same DLRM with each table choice, 2 ranks (gloo, CPU).

For every method config (``configs/default.yaml`` = full tables, ``configs/<method>_small.yaml``) this
1. runs the trainer's own training job for ``--steps`` steps per rank, launched with torchrun
   (``python -m torch.distributed.run --standalone --nproc-per-node 2 --no-python compactrec train CONFIG
   training.max_steps=N ...``; torchrun gives each rank 1 OpenMP thread on this 2-core machine), and reads
   ``samples_per_s`` (global samples over training time, evaluations excluded) from the run's ``metrics.json``;
2. measures the **peak RSS of each rank from outside**: the rank processes (torchrun's children) are polled
   every ``--poll-s`` seconds and the largest ``VmHWM`` (the kernel's own high-water mark of resident memory,
   file-backed pages such as the memory-mapped data days included) read from ``/proc/<pid>/status`` is kept,
   and the largest polled ``RssAnon`` (anonymous memory only: tables, optimizer state, activations, the
   runtime's heap; a sampled maximum, not a true high-water mark); the trainer records no peak memory itself;
3. measures the **id hashing / indexing share of a step**: in this process (1 thread, as a rank), the same
   sparse module is built on CPU from the same config and its id transform - MEM-REC's ``layout.expand``
   (hashing into token and weight rows), the remapped methods' ``layout.expand`` (hash / chunk addresses /
   LMA dictionary search / QR split), full's ``reduce_ids`` (``id mod rows``, in the data path) - is timed on
   the run's own training batches (rank 0's shard of the first ``--transform-batches``). Share = that median
   / the step time (global batch / samples_per_s).

``<method>_fused`` variants add ``embeddings.options.hash_backend=fused`` (see ``embeddings.ops.salted_hash``);
``<method>+offer`` adds ``sharding.offer_data_parallel=true`` (the planner picks row-wise or replicated tables by its
cost model); ``memrec...+dp`` forces MEM-REC's token table data_parallel. Each run records the placement the planner gave every table (``metrics.json``). Results are written
after every run; ``--resume`` keeps the runs already in ``--out``.json and runs the rest.

    PYTHONPATH=. .venv/bin/python benchmarks/e2e.py --steps 200 --out benchmarks/results/e2e
    PYTHONPATH=. .venv/bin/python benchmarks/e2e.py --kaggle-sizes --rounds 3 --methods full,memrec_fused,memrec_fused+offer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from proc_memory import RssPoller
from report_common import result_header

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"full": "configs/default.yaml", "memrec": "configs/memrec_small.yaml", "lma": "configs/lma_small.yaml",
           "robe": "configs/robe_small.yaml", "hash": "configs/hash_small.yaml", "qr": "configs/qr_small.yaml"}
FUSED = "_fused"


EXTRA: List[str] = []  # --override values, appended to every run's overrides
MODIFIERS = {  # <method>[+modifier...]: overrides of that variant
    "offer": ["sharding.offer_data_parallel=true"],  # the planner chooses row-wise or replicated by its cost model
    "dp": ["sharding.tables={memrec_tokens: {sharding_types: [data_parallel], compute_kernels: [dense]}}"],  # memrec
    # configs/kaggle_100x.yaml's table options (ROBE-Z, 1/100 of the bytes, half on hot rows, 4-float chunks)
    "p100": ["embeddings.options.budget=0.01", "embeddings.options.hot_share=0.5", "embeddings.options.chunk_size=4"],
    "p1000": ["embeddings.options.budget=0.001", "embeddings.options.hot_share=0", "embeddings.options.chunk_size=4"],
    "p10": ["embeddings.options.budget=0.1", "embeddings.options.hot_share=0.5"],  # kaggle_10x's (hash)
    # robe's array replicated: with kernel auto on CPU it runs on the fused operator (sharding.fused)
    "rep": ["sharding.tables={robe_memory: {sharding_types: [data_parallel], compute_kernels: [dense]}}"],
}


def parse_method(method: str) -> Tuple[str, List[str]]:
    """(config base name, extra overrides) of ``<method>[_fused][+modifier...]``; errors name the bad part."""
    name, *mods = method.split("+")
    base = name[: -len(FUSED)] if name.endswith(FUSED) else name
    if base not in CONFIGS:
        raise ValueError(f"method {method!r}: unknown base {base!r} (known: {', '.join(CONFIGS)})")
    extra = ["embeddings.options.hash_backend=fused"] if name.endswith(FUSED) else []
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"method {method!r}: unknown modifier {mod!r} (known: {', '.join(MODIFIERS)})")
        extra += MODIFIERS[mod]
    return base, extra


def overrides_for(method: str, run_dir: Path, steps: int) -> List[str]:
    return [*EXTRA, f"training.max_steps={steps}", "training.evals_per_epoch=0", "training.final_test=false",
            "training.progress_bar=false", "training.mlperf_log=false", f"training.run_dir={run_dir}",
            *parse_method(method)[1]]


def run_training(method: str, args: argparse.Namespace) -> Dict[str, Any]:
    base = parse_method(method)[0]
    run_dir = Path(args.runs_root) / method
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "--no-python", str(Path(sys.executable).parent / "compactrec"), "train", CONFIGS[base],
           *overrides_for(method, run_dir, args.steps)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log_path = Path(args.runs_root) / f"{method}.log"
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        poller = RssPoller(proc.pid, args.poll_s)
        poller.start()
        rc = proc.wait()
        poller.stop.set()
        poller.join()
    wall = time.perf_counter() - t0
    rec: Dict[str, Any] = {"method": method, "config": CONFIGS[base], "command": " ".join(cmd[1:]), "rc": rc,
                           "wall_s": wall, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                           "peak_rss_mib_per_rank": {r: kib / 1024 for r, kib in sorted(poller.peak_kib.items())},
                           "peak_anon_mib_per_rank": {r: kib / 1024 for r, kib in sorted(poller.anon_kib.items())}}
    if rc != 0:
        rec["error"] = log_path.read_text()[-3000:]
        return rec
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rec.update(samples_per_s=metrics["samples_per_s"], steps=metrics["steps"], global_batch=metrics["global_batch"],
               train_seconds=metrics["train_seconds"], memory_bytes=metrics["memory"]["total_bytes"],
               compression=metrics["memory"].get("compression_ratio"), val_auc=metrics["val"]["auc"],
               placement=metrics.get("placement", {}))
    rec["step_ms"] = 1e3 * metrics["global_batch"] / metrics["samples_per_s"]
    return rec


def time_transform(method: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Median ms of the method's id transform on rank 0's first training batches, 1 thread."""
    from trainer.config import load_config
    from trainer.data.loader import make_batches
    from trainer.prepare.dataset_info import dataset_info
    from trainer.train.ids import reduce_ids
    from trainer.train.model import build_sparse_arch, sparse_context

    base = parse_method(method)[0]
    config = load_config(REPO / CONFIGS[base], overrides_for(method, Path(args.runs_root) / "unused", args.steps))
    info = dataset_info(config)
    ctx = sparse_context(config, info.feature_names, info.num_embeddings_per_feature, torch.device("cpu"),
                         info.pooling_factors)
    module = build_sparse_arch(config, ctx).module
    stream = make_batches(config.data, "train", rank=0, world_size=args.nproc)
    kjts = [next(stream).sparse_features for _ in range(args.transform_batches)]
    rows = torch.tensor(info.num_embeddings_per_feature, dtype=torch.int64)
    if base == "full":
        def fn(kjt: Any) -> Any:
            return reduce_ids(kjt, rows)
    elif base == "memrec":
        def fn(kjt: Any) -> Any:
            return module.layout.expand(kjt, module.token_salts, module.weight_salts)
    else:
        buffers = module.layout_buffers()

        def fn(kjt: Any) -> Any:
            return module.layout.expand(kjt, buffers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for kjt in kjts[:3]:
                fn(kjt)
            times = []
            for _ in range(args.transform_repeats):
                for kjt in kjts:
                    t = time.perf_counter()
                    fn(kjt)
                    times.append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    return {"transform_ms": statistics.median(times), "transform_p10_ms": times[len(times) // 10],
            "transform_p90_ms": times[(9 * len(times)) // 10], "ids_per_batch": int(kjts[0].values().numel())}


def placement(tables: Dict[str, str]) -> str:
    """``table: type/kernel`` of the tables the planner placed (MEM-REC's weight table, always replicated, left
    out), or the number of tables per placement when there are more than three."""
    placed = {t: p for t, p in sorted(tables.items()) if not t.endswith("_weights")}
    if len(placed) <= 3:
        return "; ".join(f"{t}: {p}" for t, p in placed.items()) or "-"
    counts: Dict[str, int] = {}
    for p in placed.values():
        counts[p] = counts.get(p, 0) + 1
    return "; ".join(f"{n} x {p}" for p, n in sorted(counts.items()))


def markdown(results: Dict[str, Any]) -> str:
    lines = [f"# End-to-end training, {results['nproc']} ranks (gloo, CPU) ({results['date_utc']})", "",
             f"Machine: {results['machine']}. Load average at start {results['loadavg_start']}, at end "
             f"{results['loadavg_end']}. {results['steps']} steps per rank, global batch "
             f"{results['runs'][0].get('global_batch')} (configs/*_small.yaml on data/synthetic-small)."
             + (f" Every method with: `{' '.join(results.get('extra_overrides', []))}`." if results.get("extra_overrides")
                else ""), "",
             "| method | placement | memory (x smaller) | samples/s (median round) [all rounds] | step ms | x full | "
             "peak RSS rank 0 / 1 (MiB) | peak anon RSS rank 0 / 1 (MiB) | id transform ms (share of step) | "
             "load start / end |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    full = next((r for r in results["runs"] if r["method"] == "full" and "samples_per_s" in r), None)
    for r in results["runs"]:
        if "samples_per_s" not in r:
            lines.append(f"| {r['method']} | | failed (rc {r['rc']}) | | | | | | | |")
            continue
        rss = " / ".join(f"{v:,.0f}" for v in r["peak_rss_mib_per_rank"].values())
        anon = " / ".join(f"{v:,.0f}" for v in r.get("peak_anon_mib_per_rank", {}).values()) or "-"
        ratio = r["samples_per_s"] / full["samples_per_s"] if full else float("nan")
        share = r.get("transform_ms", float("nan")) / r["step_ms"]
        rounds = ", ".join(f"{v / 1e3:.1f}k" for v in r.get("samples_per_s_all_rounds", [r["samples_per_s"]]))
        lines.append(
            f"| {r['method']} | {placement(r.get('placement', {}))} | "
            f"{r['memory_bytes'] / 2**20:,.2f} MiB ({r['compression'] or 1:,.1f}x) | "
            f"{r['samples_per_s']:,.0f} [{rounds}] | {r['step_ms']:.1f} | {ratio:.2f} | {rss} | {anon} | "
            f"{r.get('transform_ms', float('nan')):.2f} [{r.get('transform_p10_ms', float('nan')):.2f}, "
            f"{r.get('transform_p90_ms', float('nan')):.2f}] ({100 * share:.1f}%) | "
            f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,memrec,memrec_fused,lma,robe,hash,qr")
    p.add_argument("--steps", type=int, default=200, help="training steps per rank")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="run the whole method list this many times (interleaved)")
    p.add_argument("--poll-s", type=float, default=0.2)
    p.add_argument("--transform-batches", type=int, default=10)
    p.add_argument("--transform-repeats", type=int, default=5)
    p.add_argument("--runs-root", default="/tmp/e2e_runs")
    p.add_argument("--out", default="benchmarks/results/e2e")
    p.add_argument("--override", action="append", default=[],
                   help="section.key=value added to every method's config (repeatable), e.g. Kaggle table sizes")
    p.add_argument("--resume", action="store_true",
                   help="keep the (method, round) runs already in --out.json (same settings) and run the rest")
    p.add_argument("--skip-transform", action="store_true",
                   help="do not time the id transform (its in-process module has no id counts: hot-row methods)")
    p.add_argument("--kaggle-sizes", action="store_true",
                   help="every method at the Criteo Kaggle table sizes (configs/criteo_kaggle.yaml; 33.8M rows)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import platform

    args = parse(argv)
    EXTRA[:] = list(args.override)
    if args.kaggle_sizes:
        from trainer.config import load_config

        sizes = load_config(REPO / "configs" / "criteo_kaggle.yaml").embeddings.num_embeddings_per_feature
        EXTRA.append(f"embeddings.num_embeddings_per_feature={sizes}")
    Path(args.runs_root).mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        parse_method(method)  # every name checked before the first run
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = _previous(args, out) or {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": args.nproc, "steps": args.steps,
        "args": vars(args), "extra_overrides": list(EXTRA), "loadavg_start": os.getloadavg(),
        "machine": f"{os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}, "
                   f"torch {torch.__version__}", "runs": [], "rounds": [[] for _ in range(args.rounds)]}
    for rnd in range(args.rounds):
        for method in methods:
            if any(r["method"] == method for r in results["rounds"][rnd]):
                continue  # --resume: done in an earlier invocation
            rec = run_training(method, args)
            if rec["rc"] == 0 and not args.skip_transform:
                rec.update(time_transform(method, args))
            rec["round"] = rnd
            print(json.dumps({k: v for k, v in rec.items() if k not in ("error", "command")}), flush=True)
            if rec["rc"] != 0:
                print(rec["error"], file=sys.stderr)
            results["rounds"][rnd].append(rec)
            _summarise(results, methods)
            _write(results, out)
    print(markdown(results))


def _previous(args: argparse.Namespace, out: Path) -> Optional[Dict[str, Any]]:
    """The results so far under ``--resume`` (same steps, rounds, ranks and overrides), else None."""
    path = out.with_suffix(".json")
    if not args.resume or not path.exists():
        return None
    previous = json.loads(path.read_text())
    for key in ("steps", "rounds", "nproc", "override", "kaggle_sizes"):
        if previous["args"].get(key) != vars(args).get(key):
            raise ValueError(f"--resume: {path} was run with {key}={previous['args'].get(key)!r}, not "
                             f"{vars(args).get(key)!r}")
    return previous


def _summarise(results: Dict[str, Any], methods: List[str]) -> None:
    """One row per method: the round with the median samples/s (all rounds' values kept beside it)."""
    results["runs"] = []
    for method in methods:
        recs = sorted((r for rr in results["rounds"] for r in rr if r["method"] == method and "samples_per_s" in r),
                      key=lambda r: r["samples_per_s"])
        if recs:
            best = dict(recs[len(recs) // 2])
            best["samples_per_s_all_rounds"] = [r["samples_per_s"] for r in recs]
            results["runs"].append(best)
        else:
            failed = [r for rr in results["rounds"] for r in rr if r["method"] == method]
            if failed:
                results["runs"].append(failed[0])
    results["loadavg_end"] = os.getloadavg()


def _write(results: Dict[str, Any], out: Path) -> None:
    results["header"] = result_header()
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
