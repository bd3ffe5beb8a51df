"""Peak resident memory of a process tree's ranks, polled from ``/proc`` (for ``e2e.py``)."""

from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _status_kib(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rank_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (OSError, ValueError):
        return None
    return None


class RssPoller(threading.Thread):
    """Largest VmHWM seen per rank (processes with RANK= in their environment) under ``root``."""

    def __init__(self, root: int, period: float) -> None:
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_kib: Dict[int, int] = {}
        self.anon_kib: Dict[int, int] = {}
        self.pids: Dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            todo, seen = [self.root], set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                rank = _rank_of(pid) if pid != self.root else None
                if rank is not None:
                    hwm = _status_kib(pid, "VmHWM")
                    anon = _status_kib(pid, "RssAnon")
                    if hwm is not None:
                        self.peak_kib[rank] = max(self.peak_kib.get(rank, 0), hwm)
                        self.pids[rank] = pid
                    if anon is not None:
                        self.anon_kib[rank] = max(self.anon_kib.get(rank, 0), anon)
                todo += _children(pid)
            self.stop.wait(self.period)
