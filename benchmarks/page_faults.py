"""Minor page faults per embedding-stage call: the cost of allocating each batch's pooled output anew.

fbgemm's inference TBE allocates its output ``[B, F * dim]`` per call and zero-fills it. glibc serves allocations
of 32 MiB and more with a fresh ``mmap``, so every call page-faults the whole output (a VM makes each fault
costly); below that, or with ``MALLOC_MMAP_MAX_=0`` (no mmap) and a high ``MALLOC_TRIM_THRESHOLD_`` (no trimming of
the heap), freed memory is reused. This prints the faults and the
time per call of ``full`` and MEM-REC per sample (its output is 1/F of full's) for a few batch sizes, under
whatever allocator the process runs with:

    PYTHONPATH=. .venv/bin/python benchmarks/page_faults.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 PYTHONPATH=. .venv/bin/python benchmarks/page_faults.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 PYTHONPATH=. .venv/bin/python benchmarks/page_faults.py
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from inference import TB_ROWS, build_method, make_batch, scaled_rows  # benchmarks/ is on sys.path as a script
from embeddings.types import SparseArchContext


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=256, help="CriteoTB rows divided by this (faults do not depend on it)")
    p.add_argument("--batch-sizes", default="2048,4096,8192")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = scaled_rows(TB_ROWS, args.scale)
    names = [f"cat_{i}" for i in range(len(rows))]
    ctx = SparseArchContext(names, rows, 128, torch.device("cpu"))
    tuned = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")]
    allocator = os.environ.get("LD_PRELOAD") or ("glibc " + " ".join(tuned) if tuned else "glibc defaults")
    print(f"allocator: {allocator}; load average {os.getloadavg()}")
    rng = np.random.default_rng(0)
    for method in ("full", "memrec_sample"):
        module, _ = build_method(method, ctx, "int8", None)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            kjt = make_batch(rng, names, rows, batch, "uniform")[1]
            faults: List[int] = []
            times: List[float] = []
            with torch.inference_mode():
                module(kjt)
                for _ in range(args.calls):
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t = time.perf_counter()
                    module(kjt)
                    times.append(time.perf_counter() - t)
                    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            out_mib = batch * (1 if method == "memrec_sample" else len(names)) * 128 * 4 / 2**20
            print(f"{method:14s} B={batch:5d} output {out_mib:6.1f} MiB: {np.median(faults):8.0f} minor faults/call, "
                  f"{np.median(times) * 1e3:7.2f} ms/call (median of {args.calls})", flush=True)


if __name__ == "__main__":
    main()
