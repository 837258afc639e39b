"""Micro-batches over epochs in a seeded order, sharded over data-parallel ranks, with a resumable position."""
from __future__ import annotations

from typing import Callable

import torch

from collie.errors import CheckpointError, DataError


class BatchStream:
    """An endless iterator of collated micro-batches.

    Epoch ``e`` visits the dataset in the permutation drawn from ``seed + e``; data-parallel rank ``r`` of
    ``n`` takes every n-th sample of each global batch, so tp/pp ranks of one replica (same ``r``) see the same
    batches. ``state_dict()`` is the position (epoch, batches taken): resuming neither repeats nor skips.
    """

    def __init__(self, dataset, batch_size: int, collate_fn: Callable, seed: int = 0, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1):
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.seed, self.shuffle, self.dp_rank, self.dp_size = seed, shuffle, dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        if len(dataset) < self.global_batch:
            raise DataError(f"the training data (data.train_files) make {len(dataset)} samples, fewer than one "
                            f"global micro-batch of train.micro_batch_size={batch_size} × {dp_size} data-parallel "
                            f"ranks; add data or lower train.micro_batch_size to at most "
                            f"{max(len(dataset) // dp_size, 1)}")
        self.epoch, self.batches_taken = 0, 0
        self._order_cache = (None, None)

    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the ragged tail is dropped so ranks stay in step

    def _order(self) -> torch.Tensor:
        epoch, order = self._order_cache
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator) if self.shuffle \
                else torch.arange(len(self.dataset))
            self._order_cache = (self.epoch, order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batches_taken >= self.batches_per_epoch():
            self.epoch, self.batches_taken = self.epoch + 1, 0
        start = self.batches_taken * self.global_batch
        indices = self._order()[start:start + self.global_batch][self.dp_rank::self.dp_size]
        self.batches_taken += 1
        return self.collate_fn([self.dataset[i] for i in indices.tolist()])

    def state_dict(self) -> dict:
        """The position in samples, so a run may resume with another data-parallel degree."""
        return {"epoch": self.epoch, "samples_taken": self.batches_taken * self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        samples = state.get("samples_taken", state.get("batches_taken", 0) * self.global_batch)
        if samples % self.global_batch:
            raise CheckpointError(f"the checkpoint stopped after {samples} samples of epoch {state['epoch']}, which is "
                             f"not a whole number of global micro-batches of {self.global_batch} "
                             f"(train.micro_batch_size × data-parallel degree); resume with a global micro-batch "
                             f"that divides it")
        self.epoch, self.batches_taken, self.seed = state["epoch"], samples // self.global_batch, state["seed"]
