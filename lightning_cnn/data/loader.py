"""How a batch is made: slices of a resident uint8 tensor, shuffled and sharded as ``DistributedSampler`` does.

There is no per-image work and no worker process: a batch is one index into a tensor that already sits on
the device that trains, and augmentation happens afterwards on the whole batch
(:mod:`lightning_cnn.data.augment`). That is what keeps data from holding training back (airbench's
``CifarLoader`` is the model).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import cast

import torch
from torch.utils.data import Dataset, DistributedSampler

from lightning_cnn.data.augment import AugmentParams
from lightning_cnn.data.sources import Split

TrainBatch = tuple[torch.Tensor, torch.Tensor, AugmentParams]
EvalBatch = tuple[torch.Tensor, torch.Tensor]


class ResidentBatches:
    """Batches of a :class:`Split` held in memory (or on the GPU).

    Training streams shuffle with ``DistributedSampler``'s exact order for ``(seed, epoch, rank)`` and draw
    per-image augmentation choices from a generator seeded by the same triple, so an epoch is reproducible
    on its own: a run resumed at an epoch boundary sees the very batches an uninterrupted run sees.
    Lightning calls :meth:`set_epoch` on ``.sampler`` at the start of every epoch.
    A training stream is resumable in Lightning's loader protocol (``state_dict``/``load_state_dict``): its
    state is the epoch and the number of batches trained in it (:attr:`consumed`, counted by the DataModule as
    each batch reaches training, so batches Lightning fetched ahead are not counted); a stream restored from it
    goes on with the next batch, with the augmentation choices an uninterrupted epoch would have drawn.
    Evaluation streams keep dataset order and give rank ``r`` of ``w`` the samples ``r, r+w, r+2w, ...``,
    with no padding, so a metric synced across ranks counts every sample exactly once.

    Args:
        split: the images and labels.
        batch_size: images per batch (the last one may be smaller unless ``drop_last``).
        train: shuffle, and emit augmentation choices as a third element when ``pad`` or ``flip_p`` is set.
        seed: base seed of the shuffle and the augmentation.
        rank: this process's index among ``world_size``.
        world_size: number of processes sharing the data.
        pad: crop padding of the augmentation (0 and ``flip_p=0`` turn it off).
        flip_p: probability of a horizontal flip.
        drop_last: drop the final incomplete batch of a training epoch.
        device: where to keep the data; batches are made there.

    Example:
        >>> split = Split(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10))
        >>> [len(y) for _, y in ResidentBatches(split, batch_size=4)]
        [4, 4, 2]
    """

    batch_sampler = None  # DataLoader-like attribute that Lightning inspects; batching is done here

    def __init__(
        self,
        split: Split,
        batch_size: int,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 0,
        flip_p: float = 0.0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.seed, self.rank = batch_size, train, seed, rank
        self.pad, self.flip_p, self.drop_last = pad, flip_p, drop_last
        self.augment = train and (pad > 0 or flip_p > 0)
        self.sampler: DistributedSampler | None = None
        if train:
            # DistributedSampler only needs len(); a Split provides it
            self.sampler = DistributedSampler(cast(Dataset, split), world_size, rank, shuffle=True, seed=seed)
        self._eval_index = torch.arange(rank, len(split), world_size, device=self.images.device)
        self.consumed = 0  # training batches of the current epoch that reached training
        self._resume: tuple[int, int] | None = None  # (epoch, batches) restored from a checkpoint

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def _epoch(self) -> int:
        return self.sampler.epoch if self.sampler is not None else 0

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _index(self) -> torch.Tensor:
        if self.sampler is None:
            return self._eval_index
        return torch.tensor(list(self.sampler), device=self.images.device)

    def __len__(self) -> int:
        n = self.sampler.num_samples if self.sampler is not None else len(self._eval_index)
        return n // self.batch_size if (self.drop_last and self.train) else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[TrainBatch | EvalBatch]:
        index = self._index()
        generator = None
        if self.augment:
            seed = f"{self.seed}/{self._epoch()}/{self.rank}"
            generator = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
        skip = 0
        if self._resume is not None and self._resume[0] == self._epoch():
            skip = self._resume[1]  # a run resumed mid-epoch: go on after the batches it trained
        self._resume, self.consumed = None, skip
        for number, start in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            batch = index[start : start + self.batch_size]
            if number < skip:
                if generator is not None:  # draw the skipped batches' choices: the generator goes on in step
                    AugmentParams.sample(len(batch), self.pad, self.flip_p, generator)
                continue
            images, labels = self.images[batch], self.labels[batch]
            if generator is None:
                yield images, labels
            else:
                params = AugmentParams.sample(len(batch), self.pad, self.flip_p, generator)
                yield images, labels, params.to(images.device)
