"""Which samples each step trains on, and the training-pair pool -- both reproducible from the step.

A *global batch* of ``B`` samples is drawn per step from an epoch permutation seeded by
``(seed, epoch)``; rank ``r`` of ``W`` takes the ``r``-th ``B/W`` slice, cut into micro-batches.
Every micro-batch has a *global chunk index* (``rank * micro_per_rank + m``) and its random numbers
(degradation decisions, noise) come from generators seeded by ``(seed, step, chunk)``. So a run with
W processes trains on exactly the same pairs and noises as one process with the same global batch,
and a resumed run needs no RNG state but the pool's contents.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from bimacosr.imageio import ImageReadError


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit seed for micro-batch ``chunk`` of ``step``."""
    return ((seed * 1_000_003 + step) * 10_007 + chunk) % (2**63 - 1)


@dataclass(frozen=True)
class BatchPlan:
    """``global_batch`` samples per step out of ``n_samples``, split over ``world`` ranks and into
    micro-batches of ``microbatch``."""

    n_samples: int
    global_batch: int
    world: int
    rank: int
    microbatch: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch % self.world:
            raise ValueError(f"train.batch[0]={self.global_batch} (the global batch) must be divisible by "
                             f"the number of processes ({self.world})")
        if self.per_rank % self.microbatch:
            raise ValueError(f"train.microbatch={self.microbatch} must divide the per-process batch "
                             f"{self.per_rank} (train.batch[0] / processes)")
        if self.n_samples < self.global_batch:
            raise ValueError(f"only {self.n_samples} training images for a global batch of "
                             f"{self.global_batch}: add images or lower train.batch[0]")

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def micro_per_rank(self) -> int:
        return self.per_rank // self.microbatch

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        """Dataset indices this rank trains on at 1-based ``step``."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        perm = torch.randperm(self.n_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = k * self.global_batch + self.rank * self.per_rank
        return perm[start: start + self.per_rank].tolist()

    def chunks(self) -> list[int]:
        """Global chunk indices of this rank's micro-batches."""
        return [self.rank * self.micro_per_rank + m for m in range(self.micro_per_rank)]


class PlanSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler for a ``DataLoader``: per step ``start..end`` the ``(epoch, index)`` pairs of
    this rank (the epoch lets the dataset seed its per-sample augmentation)."""

    def __init__(self, plan: BatchPlan, start: int, end: int):
        self.plan, self.start, self.end = plan, start, end

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end + 1):
            epoch = self.plan.epoch_of(step)
            yield [(epoch, i) for i in self.plan.indices(step)]

    def __len__(self) -> int:
        return max(self.end - self.start + 1, 0)


class TrainingDataError(RuntimeError):
    """A training image that cannot be read. ``str()`` is one line naming the file and the fix, also
    when a ``DataLoader`` worker raised it (the loader rebuilds it from a message that holds the
    worker's traceback: only that traceback's last line, this error's own, is kept)."""

    def __init__(self, message: str):
        last = message.rstrip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


class EpochIndexed(Dataset):
    """Wraps a dataset with ``set_epoch``: item ``(epoch, index)`` is ``dataset[index]`` at that epoch.
    An unreadable image raises :class:`TrainingDataError`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        try:
            return self.dataset[index]
        except ImageReadError as exc:
            raise TrainingDataError(f"training image {exc.path} cannot be read ({exc.reason}): replace or "
                                    f"remove it") from None


class PairPool:
    """Real-ESRGAN's training-pair pool (docs/pipeline.md §6.2 step 11): the first ``size / b`` batches
    are stored and used as they are; afterwards each batch is pushed into the shuffled pool and the
    first ``b`` pooled pairs are used. ``size = 0`` disables it. Shuffles use the given generator."""

    def __init__(self, size: int):
        self.size = size
        self.lq: Tensor | None = None
        self.gt: Tensor | None = None
        self.filled = 0

    def __call__(self, lq: Tensor, gt: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.size == 0:
            return lq, gt
        b = lq.shape[0]
        if self.size % b:
            raise ValueError(f"pool size {self.size} must be a multiple of the per-process batch {b}")
        if self.lq is None:
            self.lq = lq.new_zeros(self.size, *lq.shape[1:])
            self.gt = gt.new_zeros(self.size, *gt.shape[1:])
        if self.filled < self.size:
            self.lq[self.filled: self.filled + b] = lq
            self.gt[self.filled: self.filled + b] = gt
            self.filled += b
            return lq, gt
        perm = torch.randperm(self.size, generator=generator, device=generator.device).to(self.lq.device)
        self.lq, self.gt = self.lq[perm], self.gt[perm]
        out_lq, out_gt = self.lq[:b].clone(), self.gt[:b].clone()
        self.lq[:b], self.gt[:b] = lq, gt
        return out_lq, out_gt

    def state_dict(self) -> dict:
        return {"size": self.size, "filled": self.filled,
                "lq": None if self.lq is None else self.lq.cpu(), "gt": None if self.gt is None else self.gt.cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.size, self.filled = int(state["size"]), int(state["filled"])
        self.lq = None if state["lq"] is None else state["lq"].to(device)
        self.gt = None if state["gt"] is None else state["gt"].to(device)
