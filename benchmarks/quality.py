"""Quality per byte: val AUC and logloss of every method at byte budgets, against the true full model.

Each cell (dataset, method, budget, hot share, seed, epochs) is one run of the real trainer, single process
(``compactrec prepare`` then ``compactrec train CONFIG overrides``), on ``configs/default.yaml`` with:

- ``embeddings.table_sizes=counts``: the full tables' sizes are the distinct training values + 1 per feature
  (``compactrec prepare``'s id counts), the reference of every budget and compression ratio;
- ``full``: ``ids: vocabulary`` (every training value its own row: the true uncompressed model);
  ``full_mod``: the same sizes with ids reduced ``mod rows`` (the MLPerf v1 capping), reported beside it;
- every compressed method: ``budget`` = the fraction of the full tables' bytes it keeps (parameters and
  buffers, everything: dictionaries, hot-row keys, salts), ``hot_share`` of it on hot rows (0 = none);
- ``training.epochs=E`` with one validation pass per epoch: the 1-epoch AUC (the full model's training
  budget) and the best of the E epochs both come from one run (the data order is chronological and the
  learning rates constant, so epoch 1 of an E-epoch run is the 1-epoch run).

Resumable: every finished cell is appended to ``--results`` (JSON lines) and never run again; a run killed
midway restarts from scratch (its run directory is cleared). ``--jobs N`` runs N cells at once, each with
``OMP_NUM_THREADS=1``. ``report`` aggregates: mean and standard deviation over seeds, the delta to full
(difference of the means, and its seed spread), the smallest budget within a tolerance, and a plot.

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py run --data small=data/synthetic-small \\
        --methods full,full_mod,hash,robe,memrec,lma,qr --budgets 0.1,0.01,0.001 --hot 0,0.5 --seeds 0,1,2 \\
        --results benchmarks/results/quality_small.jsonl
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py report --results benchmarks/results/quality_small.jsonl \\
        --out benchmarks/results/quality_small.md --plot docs/img/quality_small.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (also when loaded from its file)
from report_common import result_header  # noqa: E402
from variants import PROTOCOL_METHODS, protocol_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin" / "compactrec"
# sparse_lr 0.2 for every method, full included: each improved over 0.1 (the 2-rank preset's value) single-process
# at global batch 1024, 0.4 was worse (docs/results/quality.md)
COMMON = ["embeddings.table_sizes=counts", "training.evals_per_epoch=1", "training.final_test=false",
          "training.progress_bar=false", "training.mlperf_log=false", "training.log_every=200",
          "optimizer.sparse_lr=0.2"]
# the protocol's per-method settings (chosen by the sweeps in docs/results/quality.md; override with --set)
def dataset_split(path: str) -> List[str]:
    """Train on every day but the last, validate on the first half of the last (as the generator's days)."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    days = int(manifest["num_days"])
    return [f"data.path={path}", f"data.train_days=[{','.join(str(d) for d in range(days - 1))}]",
            f"data.eval_day={days - 1}"]


def cell_name(cell: Dict[str, Any]) -> str:
    tag = f"_{cell['tag']}" if cell.get("tag") else ""
    budget = "" if cell["method"] in ("full", "full_mod") else f"_b{cell['budget']:g}_h{cell['hot']:g}"
    return f"{cell['dataset']}_{cell['method']}{budget}_s{cell['seed']}_e{cell['epochs']}{tag}"


def cell_overrides(cell: Dict[str, Any], data_path: str, runs_root: Path, sets: Dict[str, List[str]],
                   extra: List[str]) -> List[str]:
    method = cell["method"]
    ov = [*dataset_split(data_path), *COMMON, *protocol_overrides(method), f"training.seed={cell['seed']}",
          f"training.epochs={cell['epochs']}"]
    if method not in ("full", "full_mod"):
        ov += [f"embeddings.options.budget={cell['budget']}", f"embeddings.options.hot_share={cell['hot']}"]
    if method.startswith("lma"):
        ov.append(f"embeddings.options.index_path={runs_root / (method + '_index_' + cell['dataset'] + '.npz')}")
    return ov + sets.get("*", []) + sets.get(method, []) + extra


def run_cell(cell: Dict[str, Any], overrides: List[str], runs_root: Path, config: str) -> Dict[str, Any]:
    name = cell_name(cell)
    run_dir, log = runs_root / name, runs_root / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN.parent}:{os.environ.get('PATH', '')}"}
    if not (run_dir / "metrics.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts again
        ov = overrides + [f"training.run_dir={run_dir}"]
        start = time.time()
        with open(log, "w") as f:
            for command in ("prepare", "train"):
                subprocess.run([str(BIN), command, config, *ov], cwd=ROOT, env=env, stdout=f, stderr=f, check=True)
        wall = time.time() - start
    else:
        wall = float("nan")
    m = json.loads((run_dir / "metrics.json").read_text())
    evals = [e for e in m["evals"]]
    per_epoch = [{"epoch": e["epoch"], "auc": e["auc"], "logloss": e["logloss"]} for e in evals]
    mem = m["memory"]
    return {**cell, "name": name, "overrides": overrides, "epochs_eval": per_epoch,
            "auc_1": per_epoch[0]["auc"], "logloss_1": per_epoch[0]["logloss"],
            "auc_best": max(e["auc"] for e in per_epoch), "logloss_best": min(e["logloss"] for e in per_epoch),
            "best_epoch": max(range(len(per_epoch)), key=lambda i: per_epoch[i]["auc"]) + 1,
            "oracle_auc": evals[0].get("oracle_auc"), "total_bytes": mem["total_bytes"],
            "parameter_bytes": mem["parameter_bytes"], "buffer_bytes": mem["buffer_bytes"],
            "optimizer_state_bytes": mem["optimizer_state_bytes"], "full_table_bytes": mem["full_table_bytes"],
            "compression": mem["compression_ratio"], "samples_per_s": m["samples_per_s"], "wall_s": wall,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_results(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "header" not in r]  # the result header line (benchmarks/report_common.py)


def grid(args: argparse.Namespace) -> List[Dict[str, Any]]:
    cells = []
    for seed in args.seeds:  # seed-major: a cut-off sweep still has whole seeds
        for ds in args.data:
            for budget in args.budgets:
                for method in args.methods:
                    if method in ("full", "full_mod"):
                        if budget == args.budgets[0]:
                            cells.append({"dataset": ds, "method": method, "budget": 1.0, "hot": 0.0, "seed": seed,
                                          "epochs": args.epochs, "tag": args.tag})
                        continue
                    for hot in args.hot:
                        cells.append({"dataset": ds, "method": method, "budget": budget, "hot": hot, "seed": seed,
                                      "epochs": args.epochs, "tag": args.tag})
    return cells


def run(args: argparse.Namespace) -> None:
    results_path = Path(args.results)
    done = {r["name"] for r in read_results(results_path)}
    runs_root = Path(args.runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    sets: Dict[str, List[str]] = {}
    for item in args.set:
        method, override = item.split(":", 1)
        sets.setdefault(method, []).append(override)
    todo = [c for c in grid(args) if cell_name(c) not in done]
    print(f"{len(todo)} cells to run ({len(done)} already in {results_path})", flush=True)
    lock = threading.Lock()

    def one(cell: Dict[str, Any]) -> None:
        name = cell_name(cell)
        ov = cell_overrides(cell, args.data[cell["dataset"]], runs_root, sets, args.extra)
        try:
            rec = run_cell(cell, ov, runs_root, args.config)
        except subprocess.CalledProcessError as exc:
            print(f"{name}: FAILED (exit {exc.returncode}, see {runs_root / (name + '.log')})", flush=True)
            return
        with lock:
            if not results_path.is_file() or not results_path.read_text().strip():
                results_path.write_text(json.dumps({"header": result_header()}) + "\n")
            with open(results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"{name:44s} AUC {rec['auc_1']:.4f} (best {rec['auc_best']:.4f} @ {rec['best_epoch']})  "
              f"{rec['total_bytes']:>11,} B {rec['compression']:8.1f}x  {rec['wall_s']:.0f} s", flush=True)

    results_path.parent.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))


# ---- report ---------------------------------------------------------------------------------------------
def aggregate(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (dataset, method, budget, hot, epochs, tag) with mean/std over seeds."""
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for r in records:
        key = (r["dataset"], r["method"], r["budget"], r["hot"], r["epochs"], r.get("tag") or "")
        groups.setdefault(key, []).append(r)
    rows = []
    for (ds, method, budget, hot, epochs, tag), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])

        def stats(field: str, rs: List[Dict[str, Any]] = rs) -> Tuple[float, float]:
            vals = [r[field] for r in rs]
            return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan")

        row = {"dataset": ds, "method": method, "budget": budget, "hot": hot, "epochs": epochs, "tag": tag,
               "seeds": [r["seed"] for r in rs], "auc_1_by_seed": {r["seed"]: r["auc_1"] for r in rs},
               "auc_best_by_seed": {r["seed"]: r["auc_best"] for r in rs},
               "total_bytes": rs[0]["total_bytes"], "compression": rs[0]["compression"],
               "optimizer_state_bytes": rs[0]["optimizer_state_bytes"], "oracle_auc": rs[0].get("oracle_auc"),
               "best_epochs": [r["best_epoch"] for r in rs]}
        for field in ("auc_1", "logloss_1", "auc_best", "logloss_best"):
            row[field], row[field + "_std"] = stats(field)
        rows.append(row)
    return rows


def _full_of(rows: List[Dict[str, Any]], row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The full model of the same dataset and tag (the untagged one where the tag has none: a tag that only
    changes a method's settings with --set keeps full as it is): trained for as many epochs if there is one,
    else the one trained longest (its 1-epoch AUC is the same evaluation; its best is over its own epochs)."""
    fulls = [r for r in rows if r["method"] == "full" and r["dataset"] == row["dataset"] and r["tag"] == row["tag"]]
    if not fulls:
        fulls = [r for r in rows if r["method"] == "full" and r["dataset"] == row["dataset"] and not r["tag"]]
    same = [r for r in fulls if r["epochs"] == row["epochs"]]
    return (same or sorted(fulls, key=lambda r: -r["epochs"]) or [None])[0]


def delta(row: Dict[str, Any], full: Dict[str, Any], field: str) -> Tuple[float, float, int]:
    """(mean over common seeds of row - full, std of the per-seed differences, number of common seeds)."""
    a, b = row[f"{field}_by_seed"], full[f"{field}_by_seed"]
    common = sorted(set(a) & set(b), key=str)
    diffs = [a[s] - b[s] for s in common]
    if not diffs:
        return float("nan"), float("nan"), 0
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else float("nan"), len(diffs)


def markdown(rows: List[Dict[str, Any]], tolerance: float) -> str:
    lines = ["| dataset | method | budget | hot share | epochs | bytes kept (ratio) | optimizer state | val AUC, 1 epoch "
             "(mean ± std) | Δ AUC vs full (per-seed diff, mean ± std) | logloss, 1 epoch | best of epochs AUC "
             "[epoch] | Δ best vs full's best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["dataset"], r["tag"], -r["budget"], r["method"], r["hot"], r["epochs"])):
        full = _full_of(rows, row)
        d1 = delta(row, full, "auc_1") if full else (float("nan"),) * 3
        db = delta(row, full, "auc_best") if full else (float("nan"),) * 3
        budget = "1" if row["method"] in ("full", "full_mod") else f"1/{round(1 / row['budget'])}"
        lines.append(
            f"| {row['dataset']}{'/' + row['tag'] if row['tag'] else ''} | {row['method']} | {budget} | {row['hot']:g} | "
            f"{row['epochs']} | "
            f"{row['total_bytes']:,} ({row['compression']:.1f}x) | {row['optimizer_state_bytes']:,} | "
            f"{row['auc_1']:.4f} ± {row['auc_1_std']:.4f} (n={len(row['seeds'])}) | {d1[0]:+.4f} ± {d1[1]:.4f} | "
            f"{row['logloss_1']:.4f} | {row['auc_best']:.4f} {row['best_epochs']} | {db[0]:+.4f} ± {db[1]:.4f} |")
    lines += ["", f"Smallest bytes within {tolerance} val AUC of full (1 epoch, mean over seeds), per method:", ""]
    for ds in sorted({r["dataset"] for r in rows}):
        for method in PROTOCOL_METHODS[2:]:
            cands = [r for r in rows if r["dataset"] == ds and r["method"] == method]
            if not cands:
                continue
            ok = [r for r in cands if (f := _full_of(rows, r)) and delta(r, f, "auc_1")[0] >= -tolerance]
            if ok:
                best = min(ok, key=lambda r: r["total_bytes"])
                lines.append(f"- {ds} {method}: {best['total_bytes']:,} B ({best['compression']:.1f}x, hot share "
                             f"{best['hot']:g})")
            else:
                close = max(cands, key=lambda r: r["auc_1"] - ((_full_of(rows, r) or r)["auc_1"]))
                f = _full_of(rows, close)
                lines.append(f"- {ds} {method}: none; closest {delta(close, f, 'auc_1')[0]:+.4f} at "
                             f"{close['compression']:.1f}x, hot share {close['hot']:g}" if f else f"- {ds} {method}: no full")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 5), squeeze=False)
    colors = {"hash": "C3", "robe": "C2", "memrec": "C0", "lma": "C1", "qr": "C4", "lma_values": "C5"}
    markers = ["o", "s", "^", "D", "v"]
    for ax, ds in zip(axes[0], datasets):
        # one point per configuration: the group with the most seeds (a 2-epoch run's epoch 1 is the 1-epoch run)
        best: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
        for r in rows:
            key = (r["method"], r["tag"], r["hot"], r["budget"])
            if r["dataset"] == ds and (key not in best or len(r["seeds"]) > len(best[key]["seeds"])):
                best[key] = r
        mine = list(best.values())
        full = next((r for r in mine if r["method"] == "full" and not r["tag"]), None)
        tags = sorted({r["tag"] for r in mine})
        series: Dict[Tuple[str, str, float], List[Dict[str, Any]]] = {}
        for r in mine:
            if r["method"] in colors:
                series.setdefault((r["method"], r["tag"], r["hot"]), []).append(r)
        for (method, tag, hot), rs in sorted(series.items(), key=lambda kv: (list(colors).index(kv[0][0]), kv[0][1:])):
            xs, ys, es = zip(*sorted((r["total_bytes"], r["auc_1"], r["auc_1_std"]) for r in rs))
            label = f"{method}{' ' + tag if tag else ''}" + (f" hot {hot:g}" if hot else "")
            ax.errorbar(xs, ys, yerr=[0 if e != e else e for e in es], color=colors[method], capsize=2,
                        marker=markers[tags.index(tag) % len(markers)], ls="-" if hot > 0 else "--", label=label)
        if full:
            ax.axhline(full["auc_1"], color="k", lw=1)
            ax.axhspan(full["auc_1"] - 0.001, full["auc_1"], color="k", alpha=0.08)
            ax.annotate(f"full {full['auc_1']:.4f} ({full['total_bytes'] / 2**20:.1f} MiB)",
                        xy=(0.01, full["auc_1"]), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("bytes kept (parameters + buffers), log scale")
        ax.set_ylabel("val AUC after 1 epoch (mean ± std over seeds)")
        ax.set_title(f"{ds}: quality per byte", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(args: argparse.Namespace) -> None:
    rows = aggregate(read_results(Path(args.results)))
    text = markdown(rows, args.tolerance)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    if args.plot:
        plot(rows, Path(args.plot))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the cells not yet in --results")
    r.add_argument("--data", required=True, help="name=path[,name=path]")
    r.add_argument("--config", default="configs/default.yaml")
    r.add_argument("--methods", default=",".join(PROTOCOL_METHODS))
    r.add_argument("--budgets", default="0.1,0.01,0.001", help="fractions of the full tables' bytes")
    r.add_argument("--hot", default="0,0.5", help="hot shares")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--tag", default="", help="names a variant (with --set/--extra) so its cells are distinct")
    r.add_argument("--set", action="append", default=[], help="METHOD:section.key=value (or *:...), repeatable")
    r.add_argument("--extra", action="append", default=[], help="override for every run, repeatable")
    r.add_argument("--results", required=True)
    r.add_argument("--runs-root", default="runs/quality")
    r.add_argument("--jobs", type=int, default=1)
    q = sub.add_parser("report", help="tables and plot from --results")
    q.add_argument("--results", required=True)
    q.add_argument("--out", default=None)
    q.add_argument("--plot", default=None)
    q.add_argument("--tolerance", type=float, default=0.001)
    args = p.parse_args(argv)
    if args.command == "run":
        args.data = dict(kv.split("=", 1) for kv in args.data.split(","))
        args.methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in args.methods if m not in PROTOCOL_METHODS]
        if unknown:
            p.error(f"unknown methods {unknown}; known: {', '.join(PROTOCOL_METHODS)}")
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.hot = [float(h) for h in args.hot.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
