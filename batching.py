"""Batches of uint8 images: which indices each epoch and process takes (shuffled, or drawn balanced by class and
patient), the loader that decodes them, and a decoded cache."""
from __future__ import annotations

import itertools
import math
import signal
from collections import Counter
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dataloader import to_device
from files import DataError


class EpochBatchSampler(Sampler):
    """Index batches for one epoch and one process: the order depends on (seed, epoch) only.

    With shuffle, every epoch is a fresh permutation seeded by seed + epoch, padded to a multiple of
    world_size and dealt out to the ranks (as DistributedSampler does). Without shuffle, the ranks take
    indices rank, rank + world_size, ... with no padding, so evaluation sees every item exactly once.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.epoch = rank, world_size, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world_size))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        pad = (-len(order)) % self.world_size
        order += (order * (pad // len(order) + 1))[:pad]  # repeated as often as it takes, as DistributedSampler does
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last and len(idx) >= self.batch_size else len(idx)
        for i in range(0, stop, self.batch_size):
            yield idx[i : i + self.batch_size]

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)


class BalancedBatchSampler(EpochBatchSampler):
    """Like EpochBatchSampler, but draws each epoch's indices with replacement: both classes equally likely, unless
    keep_class_mix.

    With subjects, each class's share is split among its patients in proportion to the square root of their cell
    counts, so that one large patient does not make up a class on its own and a patient of one cell is not drawn
    hundreds of times. With keep_class_mix, each class keeps its share of the training cells instead of half, so
    the batches hold the class mix that --adapt-bn expects of the cells it scores.
    """

    def __init__(self, labels: list[int], base: EpochBatchSampler, subjects: list[str] | None = None,
                 keep_class_mix: bool = False):
        super().__init__(base.n, base.batch_size, True, base.seed, base.rank, base.world_size, base.drop_last)
        groups = subjects or [""] * len(labels)
        cells = Counter(zip(labels, groups))
        mass = {key: math.sqrt(n) if subjects else n for key, n in cells.items()}
        per_class = Counter()
        for (label, _), m in mass.items():
            per_class[label] += m
        share = Counter(labels) if keep_class_mix else dict.fromkeys(per_class, 1)
        self.weights = torch.tensor([mass[key] / cells[key] / per_class[key[0]] * share[key[0]]
                                     for key in zip(labels, groups)])

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = -(-self.n // self.world_size) * self.world_size  # as many for every rank, so none waits on a batch more
        order = torch.multinomial(self.weights, draws, replacement=True, generator=g).tolist()
        return order[self.rank :: self.world_size]


class RunBatchSampler(Sampler):
    """An EpochBatchSampler's batches of every epoch of a run, one epoch after the other: from its current epoch
    (set_epoch: where a resumed run goes on) to epochs - 1."""

    def __init__(self, sampler: EpochBatchSampler, epochs: int):
        self.sampler, self.epochs, self.batch_size = sampler, epochs, sampler.batch_size

    def __len__(self) -> int:
        return (self.epochs - self.sampler.epoch) * len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in range(self.sampler.epoch, self.epochs):
            self.sampler.set_epoch(epoch)
            yield from self.sampler


class EpochStream:
    """A run's batches from one iterator, an epoch at a time: each `for batch in stream` takes the next epoch.

    A DataLoader iterated anew every epoch leaves its workers idle between epochs, and the GPU then waits while a
    worker decodes the first batch. Iterated once, the workers decode the next epoch's first batches while this
    one ends and the model is validated.
    """

    def __init__(self, batches: Iterable, steps: int):
        self.batches, self.steps, self.stream = batches, steps, None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        if self.stream is None:
            self.stream = iter(self.batches)
        return itertools.islice(self.stream, self.steps)


class IndexedDataset(Dataset):
    """Wraps a dataset so each item also carries its index (for gathering predictions across processes). An image
    that cannot be read comes back as a LoadError instead of an item: see Batches."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            item = self.dataset[i]
        except (DataError, OSError) as e:
            return LoadError(e)
        return (i, *item) if isinstance(item, tuple) else (i, item)


class LoadError:
    """A DataError or OSError met while loading a batch, carried to the main process as the batch itself."""

    def __init__(self, error: Exception):
        self.error = error


def collate(items: list):
    """default_collate, unless an item is a LoadError: then that error is the batch."""
    return next((item for item in items if isinstance(item, LoadError)), None) or default_collate(items)


class Batches:
    """A DataLoader's batches, with an error met in a worker raised as it was raised there.

    PyTorch re-raises a worker's exception with the worker's traceback folded into its message, so that an
    unreadable image reaches the user as twenty lines with the one that names the file at the bottom.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return self.raising(iter(self.loader))  # the loader's iterator made now: its workers start decoding at once

    @staticmethod
    def raising(batches: Iterator) -> Iterator:
        for batch in batches:
            if isinstance(batch, LoadError):
                raise batch.error
            yield batch


def ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which stops cleanly
    after the current step. (SIGTERM still ends a worker: multiprocessing stops its children with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, device: torch.device) -> Batches:
    """Batches of (index, images[, labels]) decoded by `workers` processes that live as long as the loader, pinned for a
    GPU so that they cross without making the host wait. The training or scoring loop transforms each batch."""
    return Batches(DataLoader(IndexedDataset(dataset), batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                              persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                              worker_init_fn=ignore_ctrl_c, collate_fn=collate))


class CachedBatches:
    """Every decoded uint8 image of a dataset held in one tensor, in RAM or on the GPU.

    Built once by a pass of a multi-worker loader; after that an epoch decodes nothing. Batches taken from RAM
    for a GPU are pinned, so that they cross without making the host wait.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler, workers: int, device: torch.device, pin_memory: bool):
        self.sampler, self.pin = sampler, pin_memory and device.type == "cpu"
        reader = Batches(DataLoader(IndexedDataset(dataset), batch_size=64, num_workers=workers, worker_init_fn=ignore_ctrl_c,
                                    collate_fn=collate))
        images, labels = None, torch.zeros(len(dataset), dtype=torch.long)
        for batch in reader:
            index, x = batch[0], batch[1]
            if images is None:
                images = torch.empty((len(dataset), *x.shape[1:]), dtype=torch.uint8, device=device)
            images[index.to(images.device)] = x.to(images.device)
            if len(batch) > 2:
                labels[index] = batch[2]
        self.images, self.labels = images, labels.to(device)

    def __iter__(self):
        for batch in self.sampler:
            index = torch.tensor(batch)
            on_device = to_device(index, self.images.device)
            x = self.images[on_device]
            yield index, x.pin_memory() if self.pin else x, self.labels[on_device]
