"""Quality vs memory budget (issue 6): val AUC of each method at several memory budgets on a synthetic log.

Runs the real trainer, single process (``compactrec train CONFIG overrides`` without ``--nproc``), once per
(dataset, method, budget), on ``configs/default.yaml`` with the data path and the method swapped by
overrides; LMA gets its index with ``compactrec prepare`` first. The memory on the x axis is the trainer's
own memory report (``metrics.json``: every parameter and buffer kept, dictionaries included).

Budget ``f`` (fraction of the full tables' floats) per method:
- ``hash``/``robe``/``lma``: ``memory_fraction = f`` (robe/lma: one chunk = the whole embedding)
- ``memrec``: ``D = dw = round(f * sum(rows))`` token rows (K = 2, kw = 1, shared tables, weight_init ones)
- ``qr``: ``num_collisions = round(1 / f)`` (remainder tables add ``c`` rows per feature)

Usage (datasets from ``compactrec generate tiny --out DIR rows_per_day=50000`` and ``tiny-control``)::

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --data semantic=/tmp/q_tiny,control=/tmp/q_tiny_control
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --plot-only   # redraw docs/img/auc_vs_memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"memrec": "C0", "lma": "C1", "robe": "C2", "hash": "C3", "qr": "C4", "full": "k"}
    for ds, style in (("semantic", "-"), ("control", "--")):
        rows = [r for r in results["runs"] if r["dataset"] == ds and "val_auc" in r]
        for method in colors:
            pts = sorted((r["total_bytes"], r["val_auc"]) for r in rows if r["method"] == method)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, marker="*" if method == "full" else "o", color=colors[method], ms=5,
                    label=f"{method} ({ds})")
    ax.set_xscale("log")
    ax.set_xlabel("embedding memory kept (bytes, trainer memory report; log scale)")
    ax.set_ylabel("val AUC")
    ax.set_title("AUC vs memory, synthetic tiny log (50k rows/day), 1 seed, 1 epoch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(results: Dict[str, Any]) -> str:
    """val AUC (compression vs full, from the trainer's memory report) per method x budget, per dataset."""
    runs = [r for r in results["runs"] if "val_auc" in r]
    budgets = sorted({r["budget"] for r in runs if r["method"] != "full"}, reverse=True)
    lines = ["| dataset | method | " + " | ".join(f"1/{round(1 / b)}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        full = next((r for r in runs if r["dataset"] == ds and r["method"] == "full"), None)
        if full:
            lines.append(f"| {ds} | full ({full['total_bytes']:,} B) | " +
                         " | ".join(f"{full['val_auc']:.4f}" for _ in budgets) + " |")
        for m in dict.fromkeys(r["method"] for r in runs if r["method"] != "full"):
            cells = []
            for b in budgets:
                r = next((r for r in runs if r["dataset"] == ds and r["method"] == m and r["budget"] == b), None)
                cells.append("-" if r is None else f"{r['val_auc']:.4f} ({r['compression']:.1f}x)")
            lines.append(f"| {ds} | {m} | " + " | ".join(cells) + " |")
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
    args = p.parse_args(argv)
    out = ROOT / args.out
    if args.plot_only:
        results = json.loads(out.read_text())
        plot(results, ROOT / args.plot)
        out.with_suffix(".md").write_text(markdown(results))
        return
    datasets = dict(kv.split("=", 1) for kv in args.data.split(","))
    methods = args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    extra = [e for e in args.extra.split(";") if e]
    results: Dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
                               "runs": []}
    runs_root = Path(args.runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for ds in datasets:  # semantic first, budgets interleaved so a cut-off run still covers every method
        jobs.append((ds, "full", 1.0))
        for b in budgets:
            for m in methods:
                jobs.append((ds, m, b))
    for ds, method, budget in jobs:
        path = datasets[ds]
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        total_rows = sum(manifest["num_embeddings_per_feature"])
        days = int(manifest["num_days"])
        split = [f"data.train_days=[{','.join(str(d) for d in range(days - 1))}]", f"data.eval_day={days - 1}"]
        name = f"{ds}_{method}_{budget:g}"
        index_path = str(runs_root / f"lma_index_{ds}.npz")
        ov = [f"data.path={path}", *split, *method_overrides(method, budget, total_rows, index_path), *extra]
        rec: Dict[str, Any] = {"dataset": ds, "method": method, "budget": budget, "overrides": ov}
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
    out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
