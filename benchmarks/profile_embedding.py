"""Where the embedding-stage time goes (issue 6): torch.profiler per-op self CPU time of forward and
forward+backward(+fused SGD) for the methods of ``benchmarks/embedding_stage.py`` (same build path).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_embedding.py --methods full,memrec --tb-scale 256 --batch 2048
    PYTHONPATH=. .venv/bin/python benchmarks/profile_embedding.py --methods full,memrec,memrec_fused --tb-scale 64 \
        --batch 2048 --threads 1 --steps 10 --out benchmarks/results/profile_embedding_1t.json

Ops are grouped by name and input shapes (``--by-shape``, default on), so e.g. a copy of the [B, F*dim] output
shows apart from the copies of the ids. Methods as in ``embedding_stage.py`` (``<method>_fused`` included).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bench_common import touch
from embedding_stage import TB_ROWS, make_kjt, scaled_rows
from stage_methods import build_dmp, method_options
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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1: stable on a shared 2-core VM)")
    p.add_argument("--dist", default="zipf", choices=("zipf", "uniform"))
    p.add_argument("--no-by-shape", dest="by_shape", action="store_false")
    p.add_argument("--no-ddp", action="store_true", help="profile dmp.module, as embedding_stage.py --no-ddp")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows = scaled_rows(TB_ROWS, args.tb_scale)
    names = [f"cat_{i}" for i in range(len(rows))]
    ctx = SparseArchContext(names, rows, args.dim, torch.device("meta"))
    rng = np.random.default_rng(0)
    kjts = [make_kjt(rng, names, rows, args.batch, args.dist) for _ in range(args.steps)]
    grads = torch.randn(args.batch, len(names) * args.dim) * 1e-3
    import os
    report = {"args": vars(args), "profiles": {}, "loadavg_at_start": os.getloadavg()}
    for method in args.methods.split(","):
        kind, opts = method_options(method, "tb", args.dim, None)
        dmp = build_dmp(method, opts, ctx, lr=0.01, kind=kind).dmp
        touch(dmp)
        if args.no_ddp:
            dmp = dmp.module
        for phase in ("fwd", "train"):
            def step(i: int, phase: str = phase, dmp: Any = dmp) -> None:
                if phase == "fwd":
                    with torch.no_grad():
                        dmp(kjts[i])
                else:
                    (dmp(kjts[i]) * grads).sum().backward()
            step(0)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
                for i in range(args.steps):
                    step(i)
            avgs = sorted(prof.key_averages(group_by_input_shape=args.by_shape), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in avgs)
            top = [{"op": e.key + (f" {e.input_shapes}"[:90] if args.by_shape and e.input_shapes else ""),
                    "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
                    "share": e.self_cpu_time_total / max(1, total), "calls_per_step": e.count / args.steps}
                   for e in avgs[: args.top]]
            report["profiles"][f"{method}/{phase}"] = {"total_self_ms_per_step": total / 1e3 / args.steps,
                                                       "top": top}
            print(f"\n== {method} {phase}: {total / 1e3 / args.steps:.1f} ms self CPU per step (B={args.batch})")
            for t in top:
                print(f"  {t['self_ms_per_step']:9.2f} ms {100 * t['share']:5.1f}%  x{t['calls_per_step']:<5.0f} {t['op']}")
        del dmp
    report["loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
