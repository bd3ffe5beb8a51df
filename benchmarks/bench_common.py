"""Measurement helpers shared by the benchmarks: interleaved timing, summaries, machine and load records."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch import nn


def stream_copy_gbs(mib: int, repeats: int) -> Dict[str, float]:
    """STREAM-style copy bandwidth of a ``mib`` MiB float32 array (read + write bytes counted)."""
    n = mib * (1 << 20) // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    gbs = [2 * a.numel() * 4 / t / 1e9 for t in times]
    return {"array_mib": mib, "median_gbs": statistics.median(gbs), "max_gbs": max(gbs),
            "min_gbs": min(gbs), "repeats": repeats}


def touch(dmp: nn.Module) -> None:
    """Read every table once (sharded tensors through their local shards): first-touch faults out of timings."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for p in dmp.state_dict().values():
        parts = [s.tensor for s in p.local_shards()] if isinstance(p, ShardedTensor) else [p]
        for t in parts:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel():
                t.sum()


def time_it(fn: Callable[[int], None], warmup: int, repeats: int) -> List[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(warmup + i)
        out.append(time.perf_counter() - t)
    return out


def time_interleaved(steps: Dict[str, Dict[str, Callable[[int], None]]], warmup: int,
                     repeats: int) -> Dict[str, Dict[str, List[float]]]:
    """Per phase, round ``i`` runs step ``i`` of every method once (order rotated every round), so a load burst
    from another job hits all methods alike instead of one method's whole series; warm-up rounds untimed."""
    methods = list(steps)
    out: Dict[str, Dict[str, List[float]]] = {m: {} for m in methods}
    phases = list(next(iter(steps.values())))
    for phase in phases:
        for m in methods:
            out[m][phase] = []
        for i in range(warmup + repeats):
            shift = i % len(methods)
            for m in methods[shift:] + methods[:shift]:
                t = time.perf_counter()
                steps[m][phase](i)
                if i >= warmup:
                    out[m][phase].append(time.perf_counter() - t)
    return out


def summary(ts: List[float]) -> Dict[str, float]:
    a = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90))}


def lscpu() -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return out
    for line in text.splitlines():
        key = line.split(":")[0].strip()
        if key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Socket(s)"):
            out["lscpu " + key] = line.split(":", 1)[1].strip()
    return out


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count()}
    import fbgemm_gpu
    import torchrec

    info["fbgemm_gpu"] = fbgemm_gpu.__version__
    info["torchrec"] = torchrec.__version__
    info.update(lscpu())
    info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    info["loadavg_at_start"] = os.getloadavg()
    return info
