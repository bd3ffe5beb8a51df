"""Where the embedding-stage time goes (issue 6): torch.profiler per-op self CPU time of forward and
forward+backward(+fused SGD) for the methods of ``benchmarks/embedding_stage.py`` (same build path).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_embedding.py --methods full,memrec --tb-scale 256 --batch 2048
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from embedding_stage import TB_ROWS, build_dmp, make_kjt, method_options, scaled_rows, touch
from embeddings.types import SparseArchContext


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="full,memrec")
    p.add_argument("--tb-scale", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/profile_embedding.json")
    args = p.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows = scaled_rows(TB_ROWS, args.tb_scale)
    names = [f"cat_{i}" for i in range(len(rows))]
    ctx = SparseArchContext(names, rows, args.dim, torch.device("meta"))
    rng = np.random.default_rng(0)
    kjts = [make_kjt(rng, names, rows, args.batch, "zipf") for _ in range(args.steps)]
    grads = torch.randn(args.batch, len(names) * args.dim) * 1e-3
    report = {"args": vars(args), "profiles": {}}
    for method in args.methods.split(","):
        kind, opts = method_options(method, "tb", args.dim, None)
        dmp, _, _ = build_dmp(kind, opts, ctx, lr=0.01)
        touch(dmp)
        for phase in ("fwd", "train"):
            def step(i: int) -> None:
                if phase == "fwd":
                    with torch.no_grad():
                        dmp(kjts[i])
                else:
                    (dmp(kjts[i]) * grads).sum().backward()
            step(0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(args.steps):
                    step(i)
            avgs = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in avgs)
            top = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
                    "share": e.self_cpu_time_total / max(1, total), "calls_per_step": e.count / args.steps}
                   for e in avgs[: args.top]]
            report["profiles"][f"{method}/{phase}"] = {"total_self_ms_per_step": total / 1e3 / args.steps,
                                                       "top": top}
            print(f"\n== {method} {phase}: {total / 1e3 / args.steps:.1f} ms self CPU per step (B={args.batch})")
            for t in top:
                print(f"  {t['self_ms_per_step']:9.2f} ms {100 * t['share']:5.1f}%  x{t['calls_per_step']:<5.0f} {t['op']}")
        del dmp
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
