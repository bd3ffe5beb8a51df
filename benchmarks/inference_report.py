"""Markdown tables of a ``benchmarks/inference.py`` result file (the numbers of docs/RESULTS.md section 5).

    PYTHONPATH=. .venv/bin/python benchmarks/inference_report.py benchmarks/results/inference.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def _cell(rec: Dict[str, Any], ratio: bool = True) -> str:
    text = f"{rec['median_ms']:.2f} [{rec['p10_ms']:.2f}, {rec['p90_ms']:.2f}]"
    return text + (f" **{rec['vs_full']:.2f}x**" if ratio and rec["method"] != "full" else "")


def stage_table(cells: List[Dict[str, Any]], stage: str, threads: int, dist: str) -> List[str]:
    """One row per (scale, precision, batch): every method's median [p10, p90] ms and its ratio to full."""
    methods: List[str] = []
    for c in cells:
        for r in c.get("records", []):
            if r["method"] not in methods:
                methods.append(r["method"])
    lines = [f"| 1/scale, precision, B | {' | '.join(methods)} |", "|---" * (len(methods) + 1) + "|"]
    for c in cells:
        if "skipped" in c:
            continue
        recs = [r for r in c["records"] if r["stage"] == stage and r["threads"] == threads and r["dist"] == dist]
        for batch in sorted({r["batch"] for r in recs}):
            by = {r["method"]: r for r in recs if r["batch"] == batch}
            row = [_cell(by[m]) if m in by else "-" for m in methods]
            lines.append(f"| 1/{c['scale']} {c['precision']} B={batch} | " + " | ".join(row) + " |")
    return lines


def bandwidth_table(cells: List[Dict[str, Any]], threads: int, dist: str, batch: int) -> List[str]:
    lines = ["| 1/scale, precision | method | embedding ms | bound ms | fraction of the bound |", "|---|---|---|---|---|"]
    for c in cells:
        for r in c.get("records", []):
            if (r["stage"], r["threads"], r["dist"], r["batch"]) == ("embedding", threads, dist, batch):
                lines.append(f"| 1/{c['scale']} {c['precision']} | {r['method']} | {r['median_ms']:.2f} | "
                             f"{r['bandwidth_bound_ms']:.2f} | {r['fraction_of_bandwidth_bound']:.2f} |")
    return lines


def report(results: Dict[str, Any], batch: int = 2048) -> str:
    cells = sorted(results["cells"], key=lambda c: (-c["scale"], c["precision"]))
    run = results["runs"][-1]
    machine = run["machine"]
    out = [f"CPU {machine.get('lscpu Model name')} ({machine.get('lscpu CPU(s)')} CPUs, L3 "
           f"{machine.get('lscpu L3 cache')}), torch {machine.get('torch')}, fbgemm_gpu {machine.get('fbgemm_gpu')}; "
           f"read bandwidth {', '.join(f'{t} thread(s) {b:.1f} GB/s' for t, b in run['read_bandwidth_gbs'].items())}; "
           f"load average at the start of each cell: "
           + ", ".join(f"1/{c['scale']} {c['precision']} {c.get('loadavg')}" for c in cells), ""]
    skipped = [f"1/{c['scale']} {c['precision']}: {c['skipped']}" for c in cells if "skipped" in c]
    if skipped:
        out += ["Skipped: " + "; ".join(skipped), ""]
    threads = sorted({r["threads"] for c in cells for r in c.get("records", [])})
    dists = sorted({r["dist"] for c in cells for r in c.get("records", [])}, reverse=True)
    for stage in ("embedding", "ids", "lookup", "model"):
        for t in threads:
            for d in dists:
                table = stage_table(cells, stage, t, d)
                if len(table) > 2:
                    out += [f"**{stage}**, {t} thread(s), {d} ids: ms per batch, median [p10, p90], ratio to full", ""]
                    out += table + [""]
    for d in dists:
        out += [f"**fraction of the memory-bandwidth bound**, embedding stage, 1 thread, {d}, B={batch}", ""]
        out += bandwidth_table(cells, 1, d, batch) + [""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON written by benchmarks/inference.py")
    p.add_argument("--batch", type=int, default=2048, help="batch of the bandwidth table")
    args = p.parse_args(argv)
    print(report(json.loads(Path(args.results).read_text()), args.batch))


if __name__ == "__main__":
    main()
