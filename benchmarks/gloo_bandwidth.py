"""Bandwidth of gloo's collectives between CPU ranks on this machine (the figure ``sharding.cpu_comms_gbps`` sets
for the planner's cost model on CPU topologies).

    PYTHONPATH=. .venv/bin/python benchmarks/gloo_bandwidth.py --ranks 2 --mib 1,8,32

Per size and collective: median over ``--repeats`` calls of bytes per rank / time (GB/s), after 2 warm-up calls,
1 thread per rank; the load average is printed with the result.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _collectives(x: torch.Tensor, y: torch.Tensor, world: int) -> Dict[str, Callable[[], None]]:
    gathered = torch.empty(x.numel() * world)
    return {"all_reduce": lambda: dist.all_reduce(x), "all_to_all": lambda: dist.all_to_all_single(y, x),
            "all_gather": lambda: dist.all_gather_into_tensor(gathered, x)}


def _rank(rank: int, world: int, port: int, sizes: List[int], repeats: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for mib in sizes:
        n = mib * 2**20 // 4
        x, y = torch.randn(n), torch.empty(n)
        result = {}
        for name, fn in _collectives(x, y, world).items():
            for _ in range(2):
                fn()
            dist.barrier()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            result[name] = round(mib * 2**20 / sorted(times)[len(times) // 2] / 1e9, 2)
        if rank == 0:
            print(f"{mib} MiB per rank, GB/s: {result}; load {os.getloadavg()[0]:.1f}", flush=True)
    dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mib", default="1,8,32", help="tensor sizes per rank, MiB")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--port", type=int, default=29555)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.mib.split(",") if s]
    mp.spawn(_rank, args=(args.ranks, args.port, sizes, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
