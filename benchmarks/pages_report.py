"""Tables of the results pages (``docs/results/*.md``), generated from the files in ``benchmarks/results/``.

A page marks each generated table with a comment naming the view and the one result file it is made from:

    <!-- table: stage benchmarks/results/embedding_stage_tb16.json -->
    ...generated, do not edit...
    <!-- /table -->

Optional ``key=value`` words after the path pass options to the view (e.g. ``dist=uniform``). Rewrite every
page's tables (run from the repository root):

    PYTHONPATH=. .venv/bin/python benchmarks/pages_report.py

``--check`` rewrites nothing and exits 1 when a page differs from what its result files give
(``tests/benchmarks/test_results_pages.py`` runs the same check).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_common import body, read_header, read_json, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "results"
REGENERATE = "PYTHONPATH=. .venv/bin/python benchmarks/pages_report.py"
MARKER = re.compile(r"<!-- table: (\w+) (\S+)((?: [\w.]+=\S*)*) -->\n(.*?)<!-- /table -->\n", re.S)

View = Callable[[Path, Dict[str, str]], List[str]]


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


# ---- embedding_stage.py -----------------------------------------------------------------------------------
def stage(path: Path, opt: Dict[str, str]) -> List[str]:
    """Median ms per batch, fwd and train per batch size, and ``x full`` (same run) per method."""
    d = read_json(path)
    runs = [r for r in d["runs"] if r.get("fwd") and r.get("train")]
    if "shape" in opt:
        runs = [r for r in runs if r["shape"] == opt["shape"]]
    phases = opt.get("phases", "fwd,train").split(",")
    batches = sorted({r["batch"] for r in runs})
    head = [f"{p} B={b}" for p in phases for b in batches]
    lines = ["| shape | ids | method (memory) | " + " | ".join(head) + " |", "|---" * (3 + len(head)) + "|"]
    keys: List[Tuple[str, str, str]] = []
    for r in runs:
        k = (f"{r['shape']} 1/{r['scale']} d{r['dim']}", r["dist"], r["method"])
        if k not in keys:
            keys.append(k)
    for shape, dist, method in keys:
        by = {r["batch"]: r for r in runs
              if (f"{r['shape']} 1/{r['scale']} d{r['dim']}", r["dist"], r["method"]) == (shape, dist, method)}
        mem = next(iter(by.values()))["memory_bytes"] / 2**20
        cells = []
        for p in phases:
            for b in batches:
                r = by.get(b)
                if r is None:
                    cells.append("-")
                    continue
                sp = r.get("speedup_vs_full", {}).get(p)
                cells.append(_ms(r[p]["median_ms"]) + (f" ({sp:.2f}x)" if sp and method != "full" else ""))
        lines.append(f"| {shape} | {dist} | {method} ({mem:,.1f} MiB) | " + " | ".join(cells) + " |")
    return lines


# ---- e2e.py -----------------------------------------------------------------------------------------------
def e2e(path: Path, opt: Dict[str, str]) -> List[str]:
    """Per method: table memory, samples/s (median round and all rounds), peak memory per rank, id transform."""
    d = read_json(path)
    runs = d["runs"]
    full = next((r for r in runs if r["method"] == "full"), None)
    placement = any(r.get("placement") for r in runs) and opt.get("placement") == "1"
    head = ["method", "table memory (x smaller)"] + (["placement"] if placement else []) + [
        "samples/s, median round [all rounds]", "x full", "peak RSS rank 0 / 1 (MiB)",
        "peak anon RSS rank 0 / 1 (MiB)", "id transform ms [p10, p90] (share of step)", "val AUC"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in runs:
        rss, anon = r["peak_rss_mib_per_rank"], r["peak_anon_mib_per_rank"]
        rounds = ", ".join(f"{x / 1000:.1f}k" for x in sorted(r.get("samples_per_s_all_rounds", [])))
        share = r["transform_ms"] / r["step_ms"] if r.get("step_ms") and "transform_ms" in r else float("nan")
        row = [r["method"], f"{r['memory_bytes'] / 2**20:,.2f} MiB ({r['compression']:.1f}x)"]
        if placement:
            counts: Dict[str, int] = {}
            for v in eval_placement(r.get("placement")).values():
                counts[v] = counts.get(v, 0) + 1
            row.append("; ".join(f"{n} x {k}" for k, n in sorted(counts.items())))
        row += [f"{r['samples_per_s']:,.0f}" + (f" [{rounds}]" if rounds else ""),
                f"{r['samples_per_s'] / full['samples_per_s']:.2f}" if full else "-",
                f"{rss['0']:,.0f} / {rss['1']:,.0f}", f"{anon['0']:,.0f} / {anon['1']:,.0f}",
                (f"{r['transform_ms']:.2f} [{r['transform_p10_ms']:.2f}, {r['transform_p90_ms']:.2f}] ({share:.1%})"
                 if "transform_ms" in r else "not timed"),
                f"{r['val_auc']:.4f}" if r.get("val_auc") is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def eval_placement(p: Any) -> Dict[str, str]:
    if isinstance(p, dict):
        return p
    if isinstance(p, str) and p.startswith("{"):
        import ast
        return ast.literal_eval(p)
    return {}


# ---- hash_kernel.py ---------------------------------------------------------------------------------------
def hash_kernel(path: Path, opt: Dict[str, str]) -> List[str]:
    d = read_json(path)
    lines = [f"| form (used by), {d['ids']:,} ids | threads | torch ops | `compactrec::salted_hash` | speed-up |",
             "|---|---|---|---|---|"]
    for r in d["results"]:
        t, f = r["torch"], r["fused"]
        lines.append(f"| {r['form']} | {r['threads']} | {t['median_ms']:.3f} ms [{t['p10_ms']:.3f}, {t['p90_ms']:.3f}] | "
                     f"{f['median_ms']:.3f} ms [{f['p10_ms']:.3f}, {f['p90_ms']:.3f}] | {r['speedup']:.1f}x |")
    return lines


# ---- quality.py -------------------------------------------------------------------------------------------
def _quality_rows(path: Path) -> List[Dict[str, Any]]:
    import quality
    return quality.aggregate(read_jsonl(path))


def quality_grid(path: Path, opt: Dict[str, str]) -> List[str]:
    """Delta val AUC to full (1 epoch, per-seed differences), without / with hot rows, per budget."""
    import quality
    rows = [r for r in _quality_rows(path) if r["epochs"] == 1 or r["method"] == "full"]
    tags = opt.get("tags", "").split(",")
    budgets = sorted({r["budget"] for r in rows if r["method"] not in ("full", "full_mod")}, reverse=True)
    lines = ["| method | tag | " + " | ".join(f"1/{round(1 / b)}: no hot rows / hot share 0.5" for b in budgets) + " |",
             "|---" * (2 + len(budgets)) + "|"]
    full = next(r for r in rows if r["method"] == "full" and r["tag"] == "")
    keys: List[Tuple[str, str]] = []
    for r in sorted(rows, key=lambda r: (r["method"], r["tag"])):
        if r["method"] not in ("full", "full_mod") and r["tag"] in tags and (r["method"], r["tag"]) not in keys:
            keys.append((r["method"], r["tag"]))

    def cell(r: Optional[Dict[str, Any]]) -> str:
        if r is None:
            return "-"
        m, s, _ = quality.delta(r, full, "auc_1")
        return f"{m:+.4f} ± {s:.4f}"

    for method, tag in keys:
        cells = []
        for b in budgets:
            pick = {h: next((r for r in rows if (r["method"], r["tag"], r["budget"], r["hot"]) == (method, tag, b, h)),
                            None) for h in (0.0, 0.5)}
            cells.append(f"{cell(pick[0.0])} / {cell(pick[0.5])}")
        lines.append(f"| {method} | {tag or '-'} | " + " | ".join(cells) + " |")
    fm = next((r for r in rows if r["method"] == "full_mod" and r["tag"] == ""), None)
    lines += ["", f"Full (`ids: vocabulary`): val AUC {full['auc_1']:.4f} ± {full['auc_1_std']:.4f} "
              f"(n={len(full['seeds'])}), logloss {full['logloss_1']:.4f}"
              + (f"; `full_mod`: {cell(fm)} against it." if fm else ".")]
    return lines


def _pm(d: Tuple[float, float, int]) -> str:
    return f"{d[0]:+.4f}" + ("" if d[1] != d[1] else f" ± {d[1]:.4f}")


def quality_all(path: Path, opt: Dict[str, str]) -> List[str]:
    """Every aggregated cell: bytes, optimizer state, val AUC and its delta to full, logloss, best epoch."""
    import quality
    rows = _quality_rows(path)
    lines = ["| log/tag | method | budget | hot share | epochs | bytes kept (ratio) | optimizer state | val AUC, 1 epoch "
             "(mean ± std) | Δ vs full, 1 epoch (per seed) | logloss, 1 epoch | best of epochs AUC [epoch per seed] "
             "| Δ best vs full's best |", "|---" * 12 + "|"]
    for row in sorted(rows, key=lambda r: (r["dataset"], r["tag"], -r["budget"], r["method"], r["hot"], r["epochs"])):
        full = quality._full_of(rows, row)
        d1 = quality.delta(row, full, "auc_1") if full else (float("nan"),) * 3
        db = quality.delta(row, full, "auc_best") if full else (float("nan"),) * 3
        budget = "1" if row["method"] in ("full", "full_mod") else f"1/{round(1 / row['budget'])}"
        std = "" if row["auc_1_std"] != row["auc_1_std"] else f" ± {row['auc_1_std']:.4f}"
        lines.append(
            f"| {row['dataset']}{'/' + row['tag'] if row['tag'] else ''} | {row['method']} | {budget} | {row['hot']:g} | "
            f"{row['epochs']} | {row['total_bytes']:,} ({row['compression']:.1f}x) | {row['optimizer_state_bytes']:,} | "
            f"{row['auc_1']:.4f}{std} (n={len(row['seeds'])}) | {_pm(d1)} | {row['logloss_1']:.4f} | "
            f"{row['auc_best']:.4f} {row['best_epochs']} | {_pm(db)} |")
    return lines


# ---- inference.py / inference_quality.py -----------------------------------------------------------------
def inference_stage(path: Path, opt: Dict[str, str]) -> List[str]:
    """One row per (scale, precision): full's median ms, every other method's ratio full / method."""
    d = read_json(path)
    stage_, dist, batch = opt.get("stage", "embedding"), opt.get("dist", "uniform"), int(opt.get("batch", 2048))
    cells = sorted([c for c in d["cells"] if "records" in c], key=lambda c: (-c["scale"], c["precision"]))
    methods: List[str] = []
    for c in cells:
        for r in c["records"]:
            if r["method"] not in methods:
                methods.append(r["method"])
    lines = ["| 1/scale precision | " + " | ".join(m if m != "full" else "full (ms)" for m in methods)
             + " | load at start |", "|---" * (len(methods) + 2) + "|"]
    for c in cells:
        by = {r["method"]: r for r in c["records"]
              if (r["stage"], r["dist"], r["batch"], r["threads"]) == (stage_, dist, batch, 1)}
        if not by:
            continue
        row = [_ms(by[m]["median_ms"]) if m == "full" else f"{by[m]['vs_full']:.2f}x" if m in by else "-"
               for m in methods]
        lines.append(f"| 1/{c['scale']} {c['precision']} | " + " | ".join(row) + f" | {c['loadavg'][0]:.1f} |")
    return lines + _skipped_for_memory(d)


def _skipped_for_memory(d: Dict[str, Any]) -> List[str]:
    skipped = [f"1/{c['scale']} {c['precision']} ({c['skipped']})" for c in d["cells"] if "skipped" in c]
    return ["", "Skipped for memory: " + "; ".join(skipped) + "."] if skipped else []


def inference_claim(path: Path, opt: Dict[str, str]) -> List[str]:
    """Full's ms per batch and full / method for MEM-REC per token and per sample, per batch size."""
    d = read_json(path)
    stage_ = opt.get("stage", "embedding")
    cells = [c for c in d["cells"] if "records" in c]
    batches = sorted({r["batch"] for c in cells for r in c["records"]})
    lines = ["| 1/scale precision, ids | " + " | ".join(f"B = {b}" for b in batches) + " |",
             "|---" * (len(batches) + 1) + "|"]
    for c in cells:
        for dist in sorted({r["dist"] for r in c["records"]}, reverse=True):
            by = {(r["method"], r["batch"]): r for r in c["records"]
                  if r["stage"] == stage_ and r["dist"] == dist and r["threads"] == 1}
            row = []
            for b in batches:
                f, t, s = by.get(("full", b)), by.get(("memrec", b)), by.get(("memrec_sample", b))
                row.append(f"{_ms(f['median_ms'])}: {t['vs_full']:.2f}x / {s['vs_full']:.2f}x" if f and t and s else "-")
            lines.append(f"| 1/{c['scale']} {c['precision']}, {dist} | " + " | ".join(row) + " |")
    return lines + _skipped_for_memory(d)


def inference_parts(path: Path, opt: Dict[str, str]) -> List[str]:
    """Id maths (``ids``) and lookup alone, ms, per method; lookup ratio full / method."""
    d = read_json(path)
    precision, dist = opt.get("precision", "int8"), opt.get("dist", "uniform")
    c = next(c for c in d["cells"] if "records" in c and c["precision"] == precision)
    recs = [r for r in c["records"] if r["dist"] == dist and r["threads"] == 1]
    methods = [m for m in ("full", "memrec", "memrec_sample") if any(r["method"] == m for r in recs)]
    lines = ["| B | " + " | ".join(f"{m}: ids / lookup ms" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in sorted({r["batch"] for r in recs}):
        by = {(r["method"], r["stage"]): r for r in recs if r["batch"] == b}
        if ("full", "lookup") not in by:
            continue
        fl = by[("full", "lookup")]["median_ms"]
        row = []
        for m in methods:
            i, lk = by.get((m, "ids")), by.get((m, "lookup"))
            if not (i and lk):
                row.append("-")
                continue
            ratio = f" ({fl / lk['median_ms']:.2f}x full's lookup)" if m != "full" else ""
            row.append(f"{i['median_ms']:.2f} / {lk['median_ms']:.2f}{ratio}")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    return lines


def inference_quality(path: Path, opt: Dict[str, str]) -> List[str]:
    d = read_json(path)
    precisions = ["fp32", "fp16", "int8", "int4"]
    lines = ["| preset | training's val AUC | fp32 artifact | fp16 - fp32 | int8 - fp32 | int4 - fp32 | "
             "artifact MiB fp32 / fp16 / int8 / int4 | scoring samples/s fp32 / fp16 / int8 / int4 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        s = r["scores"]
        base = s["fp32"]["auc"]
        diffs = [f"{s[p]['auc'] - base:+.6f}" if p in s else "-" for p in precisions[1:]]
        mib = " / ".join(f"{s[p]['artifact_bytes'] / 2**20:.1f}" if p in s else "-" for p in precisions)
        sps = " / ".join(f"{s[p]['samples_per_s'] / 1000:.0f}k" if p in s else "-" for p in precisions)
        lines.append(f"| {name} | {r['training_val']['auc']:.6f} | {base:.6f} | " + " | ".join(diffs)
                     + f" | {mib} | {sps} |")
    return lines


# ---- files that are already text -------------------------------------------------------------------------
def markdown_file(path: Path, opt: Dict[str, str]) -> List[str]:
    return body(path).splitlines()


def text_file(path: Path, opt: Dict[str, str]) -> List[str]:
    return ["```"] + body(path).splitlines() + ["```"]


VIEWS: Dict[str, View] = {
    "stage": stage, "e2e": e2e, "hash_kernel": hash_kernel, "quality_grid": quality_grid, "quality_all": quality_all,
    "inference_stage": inference_stage, "inference_claim": inference_claim, "inference_parts": inference_parts,
    "inference_quality": inference_quality, "markdown": markdown_file, "text": text_file,
}


def provenance(path: Path) -> str:
    h = read_header(path)
    commit = str(h.get("commit", "?"))[:10]
    date = str(h.get("date", "?")).split(" (")[0]
    load = str(h.get("load", "not recorded")).split(" (")[0]
    return (f"<sub>Generated from `{path.relative_to(ROOT).as_posix()}` (measured at commit `{commit}`, {date}, "
            f"load {load}; the header of the file has the command) by `{REGENERATE}`.</sub>")


def render(view: str, rel: str, opts: str) -> str:
    path = ROOT / rel
    opt = dict(w.split("=", 1) for w in opts.split())
    return "\n".join(VIEWS[view](path, opt) + ["", provenance(path)]) + "\n"


def regenerate(text: str) -> str:
    """The page with every marked table rendered afresh from its result file."""
    def sub(m: "re.Match[str]") -> str:
        return f"<!-- table: {m.group(1)} {m.group(2)}{m.group(3)} -->\n{render(m.group(1), m.group(2), m.group(3))}" \
               "<!-- /table -->\n"
    return MARKER.sub(sub, text)


def cited_files(text: str) -> List[str]:
    """Result files a page's markers use."""
    return [m.group(2) for m in MARKER.finditer(text)]


def pages() -> List[Path]:
    return sorted(PAGES.glob("*.md"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when a page is out of date; rewrite nothing")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        old = page.read_text()
        new = regenerate(old)
        if new != old:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    for page in stale:
        print(f"{'out of date' if args.check else 'rewritten'}: {page.relative_to(ROOT)}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
