"""Tables and plots of ``embedding_stage.py`` results (Markdown next to the JSON, speed-up bar chart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def placement(record: Dict[str, Any]) -> str:
    """Sharding types of the record's tables, e.g. ``table_wise + data_parallel``."""
    return " + ".join(sorted(set(record.get("placement", {}).values()))) or "-"


def markdown(results: Dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# Embedding-stage benchmark ({results['date_utc']})", "",
             f"CPU: {m.get('lscpu Model name')} ({m.get('lscpu CPU(s)')} logical CPUs, L3 {m.get('lscpu L3 cache')}), "
             f"torch {m['torch']} ({results['args'].get('threads') or m['torch_threads']} threads"
             f"{', methods interleaved per step' if results['args'].get('interleave') else ''}"
             f"{', sharded modules called directly (--no-ddp)' if results['args'].get('no_ddp') else ''}), fbgemm_gpu {m.get('fbgemm_gpu')}, "
             f"torchrec {m.get('torchrec')}; load average at start {m.get('loadavg_at_start')}, "
             f"at end {results.get('loadavg_at_end')}.",
             f"STREAM-style copy bandwidth: **{results['stream']['median_gbs']:.2f} GB/s** median "
             f"(max {results['stream']['max_gbs']:.2f}) over a {results['stream']['array_mib']} MiB float32 array.", "",
             "Times in ms per batch: median [p10, p90]. `x full` = full median / method median (same run). "
             "`bw` = bandwidth-bound time (bytes model / STREAM copy) / measured median.", "",
             "| shape | dist | method | placement | memory | B | fwd ms | fwd x full | fwd bw | train ms | train x full | "
             "train bw | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        sp = r.get("speedup_vs_full", {})
        lines.append(
            f"| {r['shape']} 1/{r['scale']} d{r['dim']} | {r['dist']} | {r['method']} | {placement(r)} | "
            f"{r['memory_bytes']/2**20:,.1f} MiB ({r['compression']:,.0f}x) | {r['batch']} | "
            f"{r['fwd']['median_ms']:.2f} [{r['fwd']['p10_ms']:.2f}, {r['fwd']['p90_ms']:.2f}] | "
            f"{sp.get('fwd', float('nan')):.2f} | {r['fwd']['frac_of_bw']:.3f} | "
            f"{r['train']['median_ms']:.2f} [{r['train']['p10_ms']:.2f}, {r['train']['p90_ms']:.2f}] | "
            f"{sp.get('train', float('nan')):.2f} | {r['train']['frac_of_bw']:.3f} | "
            f"{r.get('loadavg', [float('nan')])[0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_speedup(results: Dict[str, Any], path: Path) -> None:
    """Speedup vs full (median / median, same run) per method and batch size, fwd and train, per id law."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "speedup_vs_full" in r and r["method"] != "full"]
    combos = sorted({(r["shape"], r["dist"]) for r in runs})
    fig, axes = plt.subplots(len(combos), 2, figsize=(10, 3.2 * len(combos)), squeeze=False)
    methods = sorted({r["method"] for r in runs})
    batches = sorted({r["batch"] for r in runs})
    width = 0.8 / max(1, len(methods))
    for row, (shape, dname) in enumerate(combos):
        for col, phase in enumerate(("fwd", "train")):
            ax = axes[row][col]
            for i, m in enumerate(methods):
                ys = [next((r["speedup_vs_full"][phase] for r in runs if r["method"] == m and r["batch"] == b
                            and r["shape"] == shape and r["dist"] == dname), float("nan")) for b in batches]
                ax.bar([j + i * width for j in range(len(batches))], ys, width, label=m)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(3.4, color="r", lw=0.8, ls="--", label="MEM-REC claim 3.4x")
            ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
            ax.set_ylabel("speedup vs full (x)")
            sc = next(r["scale"] for r in runs if r["shape"] == shape)
            ax.set_title(f"{shape} 1/{sc}, {dname} ids, {phase}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Embedding stage on CPU (fbgemm TBE, 1 process, shared 2-core machine)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: "list[str] | None" = None) -> None:
    """Print the whole table of one ``embedding_stage.py`` result file (p10/p90, bandwidth, placement, load)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="JSON written by benchmarks/embedding_stage.py")
    args = p.parse_args(argv)
    print(markdown(json.loads(Path(args.results).read_text())))


if __name__ == "__main__":
    main()
