"""Quality vs memory budget (issue 6): val AUC of each method at several memory budgets on a synthetic log.

Runs the real trainer, single process (``compactrec train CONFIG overrides`` without ``--nproc``), once per
(dataset, method, budget), on ``configs/default.yaml`` with the data path and the method swapped by
overrides; LMA gets its index with ``compactrec prepare`` first. The memory on the x axis is the trainer's
own memory report (``metrics.json``: every parameter and buffer kept, dictionaries included).

Budget ``f`` (fraction of the full tables' floats) per method:
- ``hash``/``robe``/``lma``: ``memory_fraction = f`` (robe/lma: one chunk = the whole embedding)
- ``memrec``: ``D = dw = round(f * sum(rows))`` token rows (K = 2, kw = 1, shared tables, weight_init ones)
- ``qr``: ``num_collisions = round(1 / f)`` (remainder tables add ``c`` rows per feature)

Seeds (``--seeds 0,1``) set ``training.seed`` (dense init, data order, table init); run dirs are
``<dataset>_<method>_<budget>`` for seed 0 and ``..._s<seed>`` for the others, and a finished run dir is reused.
Reported per (dataset, method, budget): mean val AUC / logloss over the seeds and each seed's value; per method,
the smallest memory whose mean AUC is within ``--tolerance`` (0.001) of full's mean AUC on the same log.

Usage (datasets from ``compactrec generate tiny --out DIR rows_per_day=50000`` and ``tiny-control``)::

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --data semantic=/tmp/q_tiny,control=/tmp/q_tiny_control \
        --seeds 0,1
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --plot-only   # redraw docs/img/auc_vs_memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin" / "compactrec"


def method_overrides(method: str, budget: float, total_rows: int, index_path: str) -> List[str]:
    if method == "full":
        return ["embeddings.kind=full"]
    if method in ("hash", "robe"):
        return [f"embeddings.kind={method}", f"embeddings.options.memory_fraction={budget}"]
    if method == "lma":
        return ["embeddings.kind=lma", f"embeddings.options.memory_fraction={budget}",
                "embeddings.options.num_hashes=2", "embeddings.options.min_count=2",
                f"embeddings.options.index_path={index_path}"]
    if method == "memrec":
        d = max(1, round(budget * total_rows))
        return ["embeddings.kind=memrec", f"embeddings.options.num_token_rows={d}",
                f"embeddings.options.num_weight_rows={d}", "embeddings.options.num_token_hashes=2",
                "embeddings.options.num_weight_hashes=1", "embeddings.options.weight_init=ones"]
    if method == "qr":
        return ["embeddings.kind=qr", f"embeddings.options.num_collisions={max(1, round(1 / budget))}"]
    raise ValueError(method)


def run_one(config: str, overrides: List[str], run_dir: Path, log: Path, prepare: bool) -> Dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN.parent}:{os.environ.get('PATH', '')}"}
    ov = overrides + [f"training.run_dir={run_dir}"]
    t = time.time()
    if (run_dir / "metrics.json").is_file():  # finished earlier (same runs root): reuse, do not retrain
        t = float("nan")
    else:
        with open(log, "a") as f:
            if prepare:
                subprocess.run([str(BIN), "prepare", config, *ov], cwd=ROOT, env=env, stdout=f, stderr=f, check=True)
            subprocess.run([str(BIN), "train", config, *ov], cwd=ROOT, env=env, stdout=f, stderr=f, check=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"val_auc": m["val"]["auc"], "val_logloss": m["val"]["logloss"], "oracle_auc": m["val"].get("oracle_auc"),
            "test_auc": m.get("test", {}).get("auc"), "total_bytes": m["memory"]["total_bytes"],
            "full_table_bytes": m["memory"]["full_table_bytes"], "compression": m["memory"]["compression_ratio"],
            "samples_per_s": m["samples_per_s"], "wall_s": time.time() - t}


def aggregate(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (dataset, method, budget): mean and per-seed val AUC / logloss (finished runs only)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results["runs"]:
        if "val_auc" in r:
            groups.setdefault((r["dataset"], r["method"], r["budget"]), []).append(r)
    out = []
    for (ds, method, budget), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        aucs = [r["val_auc"] for r in rs]
        out.append({"dataset": ds, "method": method, "budget": budget, "seeds": [r.get("seed", 0) for r in rs],
                    "val_auc": aucs, "auc_mean": statistics.mean(aucs), "auc_min": min(aucs), "auc_max": max(aucs),
                    "logloss_mean": statistics.mean(r["val_logloss"] for r in rs),
                    "val_logloss": [r["val_logloss"] for r in rs], "oracle_auc": rs[0].get("oracle_auc"),
                    "total_bytes": rs[0]["total_bytes"], "compression": rs[0]["compression"]})
    return out


def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    seeds = sorted({s for a in agg for s in a["seeds"]})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"memrec": "C0", "lma": "C1", "robe": "C2", "hash": "C3", "qr": "C4", "full": "k"}
    for ds, style in (("semantic", "-"), ("control", "--")):
        rows = [a for a in agg if a["dataset"] == ds]
        for method in colors:
            pts = sorted((a["total_bytes"], a["auc_mean"], a["auc_min"], a["auc_max"]) for a in rows
                         if a["method"] == method)
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts)
            ax.errorbar(xs, ys, yerr=[[y - v for y, v in zip(ys, lo)], [v - y for y, v in zip(ys, hi)]],
                        fmt=style, marker="*" if method == "full" else "o", color=colors[method], ms=5, capsize=2,
                        label=f"{method} ({ds})")
        oracle = next((a["oracle_auc"] for a in rows if a.get("oracle_auc")), None)
        if oracle:
            ax.axhline(oracle, color="grey", lw=0.8, ls=style)
            ax.annotate(f"oracle ({ds}) {oracle:.4f}", (ax.get_xlim()[0] if ax.get_xlim()[0] > 0 else 1e4, oracle),
                        fontsize=7, color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("embedding memory kept (bytes, trainer memory report; log scale)")
    ax.set_ylabel("val AUC (mean; bars: min-max over seeds)")
    ax.set_title(f"AUC vs memory, synthetic tiny log (50k rows/day), seeds {seeds}, 1 epoch", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(results: Dict[str, Any], tolerance: float = 0.001) -> str:
    """Mean val AUC [each seed] (compression vs full) per method x budget and dataset; logloss; the smallest
    memory within ``tolerance`` AUC of full; the oracle AUC."""
    agg = aggregate(results)
    budgets = sorted({a["budget"] for a in agg if a["method"] != "full"}, reverse=True)
    seeds = sorted({s for a in agg for s in a["seeds"]})
    head = "| dataset | method | " + " | ".join(f"1/{round(1 / b)}" for b in budgets) + " |"
    rule = "|---|---|" + "---|" * len(budgets)
    lines = [f"Seeds {seeds}. Cells: mean over seeds [seed values] (compression vs full, trainer memory report).", "",
             "### val AUC", "", head, rule]
    datasets = list(dict.fromkeys(a["dataset"] for a in agg))
    methods = list(dict.fromkeys(a["method"] for a in agg if a["method"] != "full"))

    def find(ds: str, m: str, b: float) -> Any:
        return next((a for a in agg if a["dataset"] == ds and a["method"] == m and a["budget"] == b), None)

    def cell(a: Any, key: str, per: str, fmt: str, comp: bool) -> str:
        if a is None:
            return "-"
        vals = ", ".join(format(v, fmt) for v in a[per])
        return f"{a[key]:{fmt}} [{vals}]" + (f" ({a['compression']:.1f}x)" if comp else "")

    for ds in datasets:
        full = find(ds, "full", 1.0)
        if full:
            lines.append(f"| {ds} | full ({full['total_bytes']:,} B) | " + " | ".join(
                cell(full, "auc_mean", "val_auc", ".4f", False) for _ in budgets) + " |")
        for m in methods:
            lines.append(f"| {ds} | {m} | " + " | ".join(cell(find(ds, m, b), "auc_mean", "val_auc", ".4f", True)
                                                      for b in budgets) + " |")
    lines += ["", "### val logloss", "", head, rule]
    for ds in datasets:
        full = find(ds, "full", 1.0)
        if full:
            lines.append(f"| {ds} | full | " + " | ".join(
                cell(full, "logloss_mean", "val_logloss", ".4f", False) for _ in budgets) + " |")
        for m in methods:
            lines.append(f"| {ds} | {m} | " + " | ".join(
                cell(find(ds, m, b), "logloss_mean", "val_logloss", ".4f", False) for b in budgets) + " |")
    lines += ["", f"### Smallest memory within {tolerance} AUC of full (mean over seeds)", "",
              "| dataset | full AUC (mean) | oracle AUC | " + " | ".join(methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for ds in datasets:
        full = find(ds, "full", 1.0)
        if full is None:
            continue
        cells = []
        for m in methods:
            ok = [a for a in agg if a["dataset"] == ds and a["method"] == m
                  and a["auc_mean"] >= full["auc_mean"] - tolerance]
            if ok:
                best = min(ok, key=lambda a: a["total_bytes"])
                cells.append(f"{best['total_bytes']:,} B ({best['compression']:.1f}x, AUC {best['auc_mean']:.4f})")
            else:
                gap = max(a["auc_mean"] for a in agg if a["dataset"] == ds and a["method"] == m) - full["auc_mean"]
                cells.append(f"none (best {gap:+.4f})")
        oracle = full.get("oracle_auc")
        lines.append(f"| {ds} | {full['auc_mean']:.4f} | {oracle if oracle is None else format(oracle, '.4f')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="semantic=/tmp/q_tiny,control=/tmp/q_tiny_control")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--methods", default="memrec,lma,robe,hash,qr")
    p.add_argument("--budgets", default="0.25,0.0625,0.015625,0.00390625")
    p.add_argument("--extra", default="", help="';'-separated extra overrides for every run")
    p.add_argument("--runs-root", default="/tmp/quality_runs")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--plot", default="docs/img/auc_vs_memory.png")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--seeds", default="0", help="training.seed values, e.g. 0,1")
    p.add_argument("--tolerance", type=float, default=0.001, help="AUC gap to full that still counts as equal")
    args = p.parse_args(argv)
    out = ROOT / args.out
    if args.plot_only:
        results = json.loads(out.read_text())
        plot(results, ROOT / args.plot)
        out.with_suffix(".md").write_text(markdown(results, args.tolerance))
        return
    datasets = dict(kv.split("=", 1) for kv in args.data.split(","))
    methods = args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    extra = [e for e in args.extra.split(";") if e]
    results: Dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
                               "runs": []}
    runs_root = Path(args.runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    jobs = []
    for seed in seeds:
        for ds in datasets:  # semantic first, budgets interleaved so a cut-off run still covers every method
            jobs.append((ds, "full", 1.0, seed))
            for b in budgets:
                for m in methods:
                    jobs.append((ds, m, b, seed))
    for ds, method, budget, seed in jobs:
        path = datasets[ds]
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        total_rows = sum(manifest["num_embeddings_per_feature"])
        days = int(manifest["num_days"])
        split = [f"data.train_days=[{','.join(str(d) for d in range(days - 1))}]", f"data.eval_day={days - 1}"]
        name = f"{ds}_{method}_{budget:g}" + (f"_s{seed}" if seed else "")
        index_path = str(runs_root / f"lma_index_{ds}.npz")
        ov = [f"data.path={path}", *split, *method_overrides(method, budget, total_rows, index_path),
              f"training.seed={seed}", *extra]
        rec: Dict[str, Any] = {"dataset": ds, "method": method, "budget": budget, "seed": seed, "overrides": ov}
        try:
            rec.update(run_one(args.config, ov, runs_root / name, runs_root / f"{name}.log", prepare=method == "lma"))
            print(f"{name:32s} AUC {rec['val_auc']:.4f}  {rec['total_bytes']:>10,} B  {rec['compression']:7.1f}x  "
                  f"{rec['wall_s']:.0f}s", flush=True)
        except subprocess.CalledProcessError as e:
            rec["error"] = f"exit {e.returncode}, see {runs_root / (name + '.log')}"
            print(f"{name}: FAILED ({rec['error']})", flush=True)
        results["runs"].append(rec)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    plot(results, ROOT / args.plot)
    out.with_suffix(".md").write_text(markdown(results, args.tolerance))


if __name__ == "__main__":
    main()
