"""Id hashing alone: the torch int64 ops vs the fused C kernel (``embeddings.ops.salted_hash``), same bits.

Times ``embeddings.id_hash.salted_hash`` on ``--batch`` x 26 one-hot ids (CriteoTB feature count) for the three
forms the methods use: one modulus (MEM-REC rows), a per-feature modulus (hash / ROBE / QR rows) and the raw
64-bit hash (LMA keys); median [p10, p90] over ``--repeats`` calls, for each thread count in ``--threads``.

    PYTHONPATH=. .venv/bin/python benchmarks/hash_kernel.py --out benchmarks/results/hash_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from embeddings.ops import salted_hash as fused_hash
from embeddings.remap import wrap_of
from embeddings.hashing import hash_salt
from embeddings.id_hash import salted_hash
from report_common import result_header  # benchmarks/ is on sys.path when this file runs as a script


def timed(fn: Callable[[], Any], repeats: int) -> Dict[str, float]:
    fn()
    ts: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    a = np.asarray(ts)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)), "p90_ms": float(np.percentile(a, 90))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", default="benchmarks/results/hash_kernel.json")
    args = p.parse_args()
    if not fused_hash.available():
        raise SystemExit("fused hash kernel unavailable (no C compiler): nothing to compare")
    n = args.batch * args.features
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**62), 2**62, (n,), generator=gen)
    feature = torch.repeat_interleave(torch.arange(args.features), args.batch)
    salts = hash_salt(torch.arange(args.features)[:, None], 0, torch.zeros(1, 1, dtype=torch.int64))
    rows = torch.randint(1000, 40_000_000, (args.features,), generator=gen)
    wrap = torch.tensor(wrap_of(rows.tolist()))
    forms = {
        "one modulus (memrec, D=75000)": dict(num_buckets=75000),
        "per-feature modulus (hash/robe/qr)": dict(rows=rows, wrap=wrap),
        "raw 64-bit hash (lma keys)": dict(),
    }
    out: Dict[str, Any] = {"ids": n, "loadavg_at_start": os.getloadavg(), "results": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for form, kw in forms.items():
            rec = {"threads": threads, "form": form}
            for backend in ("torch", "fused"):
                rec[backend] = timed(lambda b=backend, k=kw: salted_hash(values, feature, salts, backend=b, **k), args.repeats)
            assert torch.equal(salted_hash(values, feature, salts, backend="torch", **kw),
                               salted_hash(values, feature, salts, backend="fused", **kw))
            rec["speedup"] = rec["torch"]["median_ms"] / rec["fused"]["median_ms"]
            out["results"].append(rec)
            print(f"{threads} thread(s)  {form:36s} torch {rec['torch']['median_ms']:.3f} ms "
                  f"[{rec['torch']['p10_ms']:.3f}, {rec['torch']['p90_ms']:.3f}]  fused {rec['fused']['median_ms']:.3f} ms "
                  f"[{rec['fused']['p10_ms']:.3f}, {rec['fused']['p90_ms']:.3f}]  {rec['speedup']:.1f}x", flush=True)
    out["loadavg_at_end"] = os.getloadavg()
    out["header"] = result_header()
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
