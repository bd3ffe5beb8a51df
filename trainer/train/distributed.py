"""Process-group setup: gloo on CPU, NCCL on CUDA, chosen from the device; passed around explicitly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Who this process is and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def choose_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when present. Asking for cuda without one is an error, not a silent fallback."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _attempt_store(restart: int, world_size: int) -> dist.Store:
    """The torchrun agent's store, under a prefix of its own for this restart attempt.

    After ``torchrun --max_restarts`` restarts the workers, the agent's store still holds the previous attempt's
    keys (gloo's peer addresses among them): the new ranks then try to connect to the dead ranks' ports and
    fail with "connectFullMesh ... Connection refused" (seen with torch 2.13; pytorch/pytorch#167288 reports the
    same for NCCL). A prefix per attempt keeps the attempts apart.
    """
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"compactrec/attempt_{restart}", store)


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group set up by torchrun/torchx (env://), or make a 1-process group.

    An already initialised group (e.g. tests) is reused as it is.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    # torchrec's get_local_size() defaults to 8 when LOCAL_WORLD_SIZE is unset: always set it
    local_world_size = int(os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size)))
    device = choose_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend=backend, store=_attempt_store(restart, world_size), rank=rank,
                                    world_size=world_size)
        elif "MASTER_ADDR" in os.environ or world_size > 1:
            dist.init_process_group(backend=backend, init_method="env://")
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)
