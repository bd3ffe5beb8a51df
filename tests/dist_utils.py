"""One harness for multi-process gloo tests: spawn W ranks, file rendezvous, tracebacks surfaced.

Usage::

    def _body(rank: int, world_size: int, arg) -> Any: ...   # module-level (picklable)
    results = run_multiprocess(_body, world_size=2, args=(arg,))   # list of per-rank return values

Return values may hold tensors: they are saved to a file by the rank and loaded by the parent.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: Sequence[Any],
            queue: Any, local_world_size: int, result_file: str) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    os.environ["LOCAL_RANK"] = str(rank % local_world_size)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # one thread per rank, as torchrun sets (OMP_NUM_THREADS=1): W ranks x default threads oversubscribe the
    # cores, and OpenMP regions then wait for descheduled threads (5-20x slower steps, docs/results/training_speed.md)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # results travel through a file (torch.save), not the queue: shared-memory tensors sent through a
        # queue break when the child exits before the parent reads them
        torch.save(result, result_file)
        queue.put((rank, "ok", result_file))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_multiprocess(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (),
                     local_world_size: int | None = None, timeout: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return per-rank results.

    Any rank's exception is re-raised in the parent with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, tuple(args), queue,
                                              local_world_size or world_size, os.path.join(tmp, f"result{r}.pt")))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: List[str] = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = torch.load(payload, weights_only=False)
                else:
                    errors.append(f"--- rank {rank} ---\n{payload}")
                    break  # other ranks may now hang in a collective
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.terminate()
                    p.join()
        if errors:
            raise RuntimeError("a rank failed:\n" + "\n".join(errors))
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            raise RuntimeError(f"ranks exited with codes {bad}")
        return [results[r] for r in range(world_size)]
