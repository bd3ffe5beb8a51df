"""What a byte budget can hold exactly: the hot rows it buys, and how much validation traffic they cover.

For each budget (fraction of the full tables' bytes, sizes = distinct training values + 1) and hot share, the hot
set is selected exactly as the methods select it (``embeddings.budget.select_hot``: the globally most frequent
training values, 64 B row + 8 B key each at dim 16). Reported over the validation split (first half of the last
day): the share of its non-missing ids that are hot, that were seen in training at least 5 / 20 times but are not
hot (what the compressed tail must carry), and never seen in training. No training: this bounds what exact rows
can do at a budget, whatever the method.

    PYTHONPATH=. .venv/bin/python benchmarks/hot_coverage.py --data data/synthetic-small \\
        --out benchmarks/results/hot_coverage_small.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from embeddings.budget import BudgetOptions, select_hot
from embeddings.id_counts import load_counts
from embeddings.types import SparseArchContext


def coverage(data: Path, budgets: Sequence[float], shares: Sequence[float], dim: int) -> List[str]:
    counts = load_counts(data / "id_counts.npz")
    manifest = json.loads((data / "manifest.json").read_text())
    eval_day = int(manifest["num_days"]) - 1
    sparse = np.load(data / f"day_{eval_day}_sparse.npy", mmap_mode="r")
    val = np.asarray(sparse[: (sparse.shape[0] + 1) // 2])
    names = counts.feature_names
    ctx = SparseArchContext(names, counts.table_sizes(), dim, torch.device("meta"), id_counts=counts)
    count_of = [dict(zip(v.tolist(), c.tolist())) for v, c in zip(counts.values, counts.counts)]
    seen = np.stack([np.array([count_of[f].get(x, 0) for x in val[:, f].tolist()]) for f in range(len(names))], 1)
    present = val != 0  # npy id 0 = missing (generator convention)
    total = int(present.sum())
    lines = ["| budget | hot share | hot rows | val ids hot | not hot, seen >= 20x | not hot, seen 5-19x | "
             "not hot, seen 1-4x | never seen |", "|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        for share in shares:
            hot = select_hot(ctx, BudgetOptions(budget=budget, hot_share=share, hot_min_count=2), dim * 4)
            is_hot = np.stack([np.isin(val[:, f], hot.values[f]) for f in range(len(names))], 1) & present
            cold = present & ~is_hot

            def share_of(mask: np.ndarray) -> str:
                return f"{mask.sum() / total:.1%}"

            lines.append(f"| 1/{round(1 / budget)} | {share:g} | {hot.total:,} | {share_of(is_hot)} | "
                         f"{share_of(cold & (seen >= 20))} | {share_of(cold & (seen >= 5) & (seen < 20))} | "
                         f"{share_of(cold & (seen >= 1) & (seen < 5))} | {share_of(cold & (seen == 0))} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory holding id_counts.npz (compactrec prepare)")
    p.add_argument("--budgets", default="0.1,0.01,0.001")
    p.add_argument("--shares", default="0.5,0.8,0.99")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lines = coverage(Path(args.data), [float(b) for b in args.budgets.split(",")],
                     [float(s) for s in args.shares.split(",")], args.dim)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
