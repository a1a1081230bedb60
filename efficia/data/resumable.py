"""A shuffled order that a resumed run can continue exactly where the interrupted run stopped.

The order of epoch e is a permutation seeded by (seed + e), sharded over processes (DistributedSampler
semantics; Lightning leaves it in place). The position is not counted in the loader (workers and
Lightning's fetcher read ahead) but taken from the trainer's own count of batches trained this epoch.
A run that ended at max_steps is counted by Lightning as a finished epoch; resuming it with more steps
still continues the same permutation where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle; after `resume_at`, the next pass continues a given permutation part-way."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resume: tuple[int, int] | None = None  # (permutation, samples of it already used), applied once

    def resume_at(self, permutation: int, samples: int) -> None:
        self.resume = (permutation, samples)

    def __iter__(self) -> Iterator[int]:
        if self.resume is None:
            return super().__iter__()
        (permutation, skip), self.resume = self.resume, None
        if skip >= self.num_samples:  # that permutation was used up: the next epoch's order as usual
            return super().__iter__()
        epoch, self.epoch = self.epoch, permutation
        indices = list(super().__iter__())[skip:]
        self.epoch = epoch
        return iter(indices)


def training_position(trainer: L.Trainer | None, sampler: ResumableSampler | None) -> dict[str, Any]:
    """The permutation in use and how many batches of it were trained, as the checkpoint being written sees it."""
    if trainer is None or sampler is None:
        return {}
    return {"permutation": sampler.epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}
