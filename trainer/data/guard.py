"""A data error on one rank ends the batch stream on every rank at the same batch, so training state survives.

Readers raise clear errors (file, line, field) for bad input. Inside ``TrainPipelineSparseDist`` such an
error would otherwise surface on one rank only, mid-step, while the other ranks wait in the next collective
(and the batches already in the pipeline would be lost). ``GuardedBatches`` wraps a rank's batch iterator:

- every fetch ends with a two-flag all-reduce (this rank failed / this rank ran out), so all ranks learn at
  the same fetch that one of them failed, and all of them stop there: ``__next__`` raises ``StopIteration``,
  the pipeline finishes the batches it already holds (every batch before the bad one is trained) and drains;
- the caller then checks :meth:`GuardedBatches.raise_if_failed`: the failing rank's message is gathered onto
  every rank and raised as :class:`DataError` after the caller has saved what it must (the trainer writes a
  checkpoint at the exact batch position first).

The all-reduce is one 2-element tensor per batch on the process group's device (CPU for gloo, the rank's GPU
for NCCL). Ranks that run out of batches at different fetches are a bug in the data split, reported the
same way instead of hanging.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist

from trainer.errors import DataError

T = TypeVar("T")


class GuardedBatches(Iterator[T]):
    """Iterator over ``inner`` that stops on every rank together when any rank's data raises."""

    def __init__(self, inner: Iterator[T], device: torch.device, what: str) -> None:
        self._inner = inner
        self._device = device
        self._what = what
        self._stopped = False
        self._local: Optional[str] = None  # this rank's error, "Type: message"
        self.failed = False  # some rank's data failed
        self.count = 0  # batches handed out (identical on every rank)

    def __iter__(self) -> "GuardedBatches[T]":
        return self

    def __next__(self) -> T:
        if self._stopped:
            raise StopIteration
        failed, exhausted = 0.0, 0.0
        item: Optional[T] = None
        try:
            item = next(self._inner)
        except StopIteration:
            exhausted = 1.0
        except Exception as exc:  # any error in reading/transforming: reported with its type and message
            failed = 1.0
            self._local = f"{type(exc).__name__}: {exc}"
        flags = torch.tensor([failed, exhausted, 1.0 - exhausted], device=self._device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags)
        n_failed, n_exhausted, n_going = (float(v) for v in flags.tolist())
        if n_failed > 0:
            self.failed = True
        elif n_exhausted > 0 and n_going > 0:
            self.failed = True
            self._local = (f"rank ran out of {self._what} batches after {self.count} while another rank had more "
                           "(the data split gave the ranks different batch counts)") if exhausted else None
        if self.failed or n_exhausted > 0:
            self._stopped = True
            raise StopIteration
        self.count += 1
        assert item is not None
        return item

    def messages(self) -> List[str]:
        """Every rank's error message (collective when the world is larger than 1)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [self._local] if self._local else []
        gathered: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._local)
        return [f"rank {r}: {m}" for r, m in enumerate(gathered) if m]

    def raise_if_failed(self, where: str) -> None:
        """Raise :class:`DataError` on every rank if any rank's data failed (collective when it did)."""
        if not self.failed:
            return
        details = "; ".join(self.messages()) or "unknown error"
        raise DataError(f"{self._what} data failed {where}: {details}")


__all__ = ["DataError", "GuardedBatches"]
