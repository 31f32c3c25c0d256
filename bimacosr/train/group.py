"""The processes of a training job: this process's place in it, and stopping them together.

Under ``torchrun`` an error in one process must stop all of them at the same point, with one
message, instead of leaving the others waiting in a collective until a timeout (the misleading
"connection closed" errors). :meth:`Dist.together` runs a block on every rank and, if it raised
anywhere, raises on every rank: the rank's own error, or :class:`PeerFailed` carrying the first
failing rank's message; such errors have ``agreed = True``. It costs one all-reduce of a flag
when nothing failed.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Another process of the job stopped with an error; the message is that process's."""


@dataclass
class Dist:
    """This process's place in the job (``rank 0 of 1`` without ``torchrun``)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is set on any rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank; if it raised on any rank, raise on all of them (see the
        module docstring). The block must not itself use collectives that could be left waiting."""
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # re-raised below, on every rank
            error = exc
        if self.any(error is not None) and self.world > 1:
            messages: list[str | None] = [None] * self.world
            dist.all_gather_object(messages, None if error is None else str(error))
            error = error or PeerFailed(next(m for m in messages if m is not None))
            error.agreed = True  # every rank raises here: they may still meet in a collective
        if error is not None:
            raise error


def init_distributed() -> Dist:
    """NCCL on CUDA, gloo on CPU, from torchrun's environment; a plain process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)
