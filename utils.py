"""What train.py, evaluate.py, predict.py and plot.py share: devices, checkpoints, batches, inference."""
from __future__ import annotations

import argparse
import copy
import ctypes
import glob
import importlib.util
import itertools
import json
import os
import platform
import signal
import sys
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataloader import BatchTransform, DataError, Preprocess, atomic_write, to_device
from resnet import MODELS, ResNet, build_model

CHECKPOINT_KEYS = ("model", "model_name", "num_classes", "preprocess", "epoch")


class CheckpointError(Exception):
    """A checkpoint that cannot be used here; the message names the file and what to do."""


def run_main(main: Callable[[argparse.Namespace], int], parse_args: Callable[[], argparse.Namespace]) -> None:
    """sys.exit(main(parse_args())); a problem with the data, a checkpoint or a file, met while running or while
    reading the flags (train.py's --resume reads the checkpoint), ends the script with its message, no traceback."""
    try:
        code = main(parse_args())
    except (DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a batch size, a count of epochs)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (--workers, where 0 loads the data in the main process)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number of at least 0")
    return value


# ----------------------------------------------------------------------------------------------------------
# Devices and precision


DEVICES = ("auto", "cuda", "mps", "cpu")  # what every script's --device accepts
WORKERS = min(8, os.cpu_count() or 1)  # every script's default --workers


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no CUDA GPU (use --device auto or cpu)")
    return torch.device(name)


def keep_freed_memory(device: torch.device) -> None:
    """On a CPU device, have glibc's malloc keep freed memory for the next allocation instead of giving it back.

    By default glibc takes every block over 32 MB (a float batch, an activation at 350 px) fresh from the
    system and gives it back when freed, so each step pays a page fault for every 4 KB it writes. Kept, the
    memory is reused: on a 2-core machine the input pipeline ran 15-30% faster and 8 epochs of ResNet18 at
    224 px 11% faster, for 7-20% more resident memory, which stays at its peak. jemalloc and tcmalloc, which
    PyTorch's CPU performance guide suggests, do the same. Nothing changes on a GPU or without glibc.
    """
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets a mapping of its own; all come from the heap...
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ...which keeps up to 2 GiB free at its top


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype: on CUDA bf16 where supported, else fp16; None (fp32) on the CPU, with amp='off',
    and for 'auto' on other devices (ask for bf16 or fp16 there explicitly)."""
    if amp == "off" or device.type == "cpu" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """torch.save through atomic_write, which first checks that the disk has room for its tensors and 1 MB more."""
    tensors = sum(t.numel() * t.element_size() for t in tensors_in(checkpoint))
    atomic_write(path, lambda f: torch.save(checkpoint, f), size=tensors + 2**20)


def tensors_in(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project, read with weights_only=True; a clear error for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint. Runs are folders under checkpoints/ holding last.pt and best.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                              "it may be truncated or from another program") from e
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (a bare state_dict?); "
                              f"expected the keys {', '.join(CHECKPOINT_KEYS)}")
    if checkpoint["model_name"] not in MODELS:
        raise CheckpointError(f"{path}: unknown model {checkpoint['model_name']!r}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, device: torch.device) -> tuple[ResNet, Preprocess]:
    """The network (EMA weights where the run kept them: those are what it validated) and its preprocessing."""
    model = build_model(checkpoint["model_name"], num_classes=checkpoint["num_classes"])
    try:
        model.load_state_dict(checkpoint.get("ema") or checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit a {checkpoint['model_name']} with {checkpoint['num_classes']} classes: {e}") from e
    return model.to(device).eval(), Preprocess.from_dict(checkpoint["preprocess"])


def find_runs(checkpoints_dir: str = "checkpoints", model: str | None = None, name: str = "best.pt") -> list[str]:
    """Run folders under checkpoints_dir holding `name`, optionally only those of one model."""
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(checkpoints_dir, "*", name)))
    return runs if model is None else [r for r in runs if run_model(r, name) == model]


def run_model(run: str, name: str = "best.pt") -> str:
    """The model a run trains, from its args.json (cheap), else from its checkpoint."""
    try:
        with open(os.path.join(run, "args.json")) as f:
            return json.load(f)["model"]
    except (OSError, ValueError, KeyError):
        return load_checkpoint(os.path.join(run, name))["model_name"]


# ----------------------------------------------------------------------------------------------------------
# Batches of uint8 images


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
        order += order[: (-len(order)) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last and len(idx) >= self.batch_size else len(idx)
        for i in range(0, stop, self.batch_size):
            yield idx[i : i + self.batch_size]

    def numbered(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, step, indices) of each batch of the current epoch."""
        for step, indices in enumerate(self):
            yield self.epoch, step, indices

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)


class RunBatchSampler(Sampler):
    """An EpochBatchSampler's batches of every epoch of a run, one epoch after the other: from its current epoch
    (set_epoch: where a resumed run goes on) to epochs - 1."""

    def __init__(self, sampler: EpochBatchSampler, epochs: int):
        self.sampler, self.epochs, self.batch_size = sampler, epochs, sampler.batch_size

    def __len__(self) -> int:
        return (self.epochs - self.sampler.epoch) * len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, indices in self.numbered():
            yield indices

    def numbered(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, step, indices) of each batch of the run."""
        for epoch in range(self.sampler.epoch, self.epochs):
            self.sampler.set_epoch(epoch)
            yield from self.sampler.numbered()


class EpochStream:
    """A run's batches from one iterator, an epoch at a time: each `for batch in stream` takes the next epoch.

    A DataLoader iterated anew every epoch leaves its workers idle from the end of one epoch until the next one
    asks for its first batch, and the GPU then waits while one worker decodes a whole batch. On the H200 machine
    at 450 px the GPU waited about 0.4 s an epoch for data, for ResNet18 as for ResNet50: about the time one
    worker takes to decode a batch of 64. Iterated once, the loader's workers decode the next epoch's first
    batches while this one ends and the model is validated.
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
    """Wraps a dataset so each item also carries its index (for gathering predictions across processes)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, tuple) else (i, item)


def ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which stops cleanly
    after the current step. (SIGTERM still ends a worker: multiprocessing stops its children with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, device: torch.device, transform: BatchTransform | None = None,
                seeds: Callable[[int, int], int] | None = None) -> tuple[Iterable, BatchTransform | None]:
    """Batches of (index, images[, labels]) decoded by `workers` processes that live as long as the loader, and what
    is left of `transform` for the loop to apply to each batch on the device (None: nothing).

    For a GPU the images come as uint8 in pinned memory, and the GPU transforms them. On a CPU device the workers
    apply the transform too, into the shared slots of a SlotLoader, the random draws of a batch seeded by
    seeds(epoch, step). With no workers the loop does it all.
    """
    if workers > 0 and device.type == "cpu":
        return SlotLoader(dataset, sampler, workers, transform, seeds), None
    loader = DataLoader(IndexedDataset(dataset), batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_ctrl_c)
    return loader, transform


class SlotLoader:
    """Batches of (index, images[, labels]) that worker processes make straight in the slots of one shared-memory
    buffer, which lives as long as the loader: how a CPU device gets its batches.

    The workers decode each batch's images and, given a BatchTransform, apply it too, one thread each: the batch
    then comes as float (N, 3, H, W), ready for the network. Its random draws come from a generator seeded by
    seeds(epoch, step) (the sampler's numbered batches), so they depend neither on the workers nor on the
    device: the loop of a GPU seeds them alike. Without a transform the images stay uint8 (H, W, 3).

    Why, on 2 cores (BENCHMARKS.md): a DataLoader's worker puts every batch into fresh shared memory, which the
    kernel then zeroes and maps page by page in both processes; with uint8 slots instead, the input pipeline went
    from 960 to 1,350 img/s. And with the transform in the training process, its two threads and the two workers
    took turns on the cores, and each image crossed the caches twice: transformed by the worker that decoded it,
    1,190 img/s became 1,380 (medians of six turns in one process). A slot of floats is 4 times the size of a
    uint8 one, and there are as many as a DataLoader with float batches holds (two a worker), plus two.

    The slots are taken in turn. A DataLoader has at most workers * prefetch batches in flight, so with two
    slots more, a batch stays as it is until the consumer takes the batch after next: use it before then
    (train.py and evaluation do). A pass of fewer batches, such as the valid set's, gets a slot for each. Every
    image must have the first one's shape, as in any batch.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler, workers: int, transform: BatchTransform | None = None,
                 seeds: Callable[[int, int], int] | None = None, prefetch: int = 2):
        self.sampler, self.slots = sampler, min(workers * prefetch + 2, len(sampler))  # a short pass: a slot a batch
        first = dataset[0]  # decoded here once, for the shape of the buffer
        h, w, c = (first[0] if isinstance(first, tuple) else first).shape
        shape, dtype = ((c, h, w), torch.float32) if transform is not None else ((h, w, c), torch.uint8)
        self.images = torch.empty((self.slots, sampler.batch_size, *shape), dtype=dtype).share_memory_()
        self.loader = DataLoader(SlotFiller(dataset, self.images, (h, w, c), transform), sampler=SlotJobs(sampler, self.slots, seeds),
                                 batch_size=None, num_workers=workers, persistent_workers=True, prefetch_factor=prefetch,
                                 worker_init_fn=ignore_ctrl_c)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.batches(iter(self.loader))  # the workers start now, as with a DataLoader

    def batches(self, jobs: Iterator) -> Iterator[tuple[torch.Tensor, ...]]:
        for slot, indices, labels in jobs:
            images = self.images[slot, : len(indices)]
            yield (torch.tensor(indices), images) if labels is None else (torch.tensor(indices), images, torch.tensor(labels))


class SlotJobs(Sampler):
    """A batch sampler's batches as jobs (slot, indices, seed): the k-th batch of each pass goes to slot k % slots;
    the seed, of its random draws, is seeds(epoch, step), or None without seeds."""

    def __init__(self, sampler: Sampler, slots: int, seeds: Callable[[int, int], int] | None):
        self.sampler, self.slots, self.seeds = sampler, slots, seeds

    def __iter__(self) -> Iterator[tuple[int, list[int], int | None]]:
        for k, (epoch, step, indices) in enumerate(self.sampler.numbered()):
            yield k % self.slots, indices, None if self.seeds is None else self.seeds(epoch, step)


class SlotFiller(Dataset):
    """Run in a worker: makes a job's batch in its slot and returns (slot, indices, labels or None)."""

    def __init__(self, dataset: Dataset, images: torch.Tensor, shape: tuple[int, int, int], transform: BatchTransform | None):
        self.dataset, self.images, self.shape, self.transform = dataset, images, shape, transform
        self.decoded = None  # with a transform: the worker's own uint8 batch, made on its first job

    def __getitem__(self, job: tuple[int, list[int], int | None]):
        slot, indices, seed = job
        if self.transform is None:
            decoded = self.images[slot, : len(indices)]
        else:
            if self.decoded is None:
                self.decoded = torch.empty((self.images.shape[1], *self.shape), dtype=torch.uint8)
            decoded = self.decoded[: len(indices)]
        labels = []
        for i, index in enumerate(indices):
            item = self.dataset[index]
            image = item[0] if isinstance(item, tuple) else item
            if image.shape != self.shape:
                name = getattr(self.dataset, "img_name", None)
                raise DataError(f"{name[index] if name else f'item {index}'} decodes to {tuple(image.shape)}, the first image to "
                                f"{self.shape}: images of one batch must match (--crop or --image-size make them)")
            decoded[i].copy_(image)
            labels.append(item[1] if isinstance(item, tuple) else None)
        if self.transform is not None:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            self.transform(decoded, generator, out=self.images[slot, : len(indices)])
        return slot, list(indices), None if labels[0] is None else labels


class CachedBatches:
    """Every decoded uint8 image of a dataset held in one tensor, in RAM or on the GPU.

    Built once by a pass of a multi-worker loader; after that an epoch decodes nothing. Batches taken from RAM
    for a GPU are pinned, so that they cross without making the host wait.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler, workers: int, device: torch.device, pin_memory: bool):
        self.sampler, self.pin = sampler, pin_memory and device.type == "cpu"
        reader = DataLoader(IndexedDataset(dataset), batch_size=64, num_workers=workers, worker_init_fn=ignore_ctrl_c)
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


# ----------------------------------------------------------------------------------------------------------
# Inference


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches, transform: BatchTransform | None, device: torch.device,
                   dtype: torch.dtype | None = None, channels_last: bool = False, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, float32 logits) over batches of (index, image[, label]), uint8 images transformed here (float ones,
    with transform None, already were); with tta, averaged over 4 flips."""
    model.eval()
    all_index, all_logits = [], []
    for batch in batches:
        index, x = batch[0], batch[1].to(device, non_blocking=True)
        x = transform(x) if transform is not None else x
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if tta else [x]
        with autocast(device, dtype):
            logits = sum(model(v).float().softmax(1) for v in views) / len(views) if tta else model(x).float()
        all_index.append(index.cpu())
        all_logits.append((logits.clamp_min(1e-12).log() if tta else logits).cpu())
    return torch.cat(all_index), torch.cat(all_logits)


@torch.no_grad()
def adapt_batchnorm(model: torch.nn.Module, batches, transform: BatchTransform | None, device: torch.device,
                    dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.nn.Module:
    """A copy of model whose BatchNorm layers keep the mean and variance of their inputs over every image of
    `batches` (AdaBN, Li et al. 2016): for images of another patient, stain or microscope than the training set's.

    One pass in training mode, each layer normalising by its batch as in training; the statistics are exact over
    all images (pooled per channel, not a moving average), so batch order barely matters. Needs no labels; the
    model given is left as it was.
    """
    adapted = copy.deepcopy(model)
    layers = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    pooled = {}  # layer -> (pixels, mean, sum of squared deviations), float64

    def record(layer, inputs):
        x = inputs[0].float()
        var, mean = torch.var_mean(x, dim=[d for d in range(x.ndim) if d != 1], correction=0)
        n, mean, squares = x.numel() // x.shape[1], mean.double(), var.double() * (x.numel() // x.shape[1])
        if layer in pooled:  # Chan et al.'s pairwise update
            total, old_mean, old_squares = pooled[layer]
            delta = mean - old_mean
            mean, squares = old_mean + delta * n / (total + n), old_squares + squares + delta**2 * total * n / (total + n)
            n += total
        pooled[layer] = (n, mean, squares)

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    adapted.train()
    try:
        for batch in batches:
            x = batch[1].to(device, non_blocking=True)
            x = transform(x) if transform is not None else x
            with autocast(device, dtype):
                adapted(x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        n, mean, squares = pooled[layer]
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(squares / max(n - 1, 1))  # unbiased, as BatchNorm keeps it
    return adapted.eval()


def adapt_to_dataset(model: torch.nn.Module, preprocess: Preprocess, dataset: Dataset, device: torch.device,
                     batch_size: int = 64, workers: int = 2) -> torch.nn.Module:
    """adapt_batchnorm over every image of a uint8 dataset: a copy of model for scoring that dataset."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False)
    batches, transform = make_loader(dataset, sampler, workers, device, BatchTransform(preprocess))
    return adapt_batchnorm(model, batches, transform, device, amp_dtype(device), channels_last=device.type == "cuda")


def dataset_logits(model: torch.nn.Module, preprocess: Preprocess, dataset: Dataset, device: torch.device,
                   batch_size: int = 64, workers: int = 2, tta: bool = False) -> torch.Tensor:
    """float32 logits (N, classes) for every item of a uint8 dataset, in dataset order. Never shuffled."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False)
    batches, transform = make_loader(dataset, sampler, workers, device, BatchTransform(preprocess))
    index, logits = predict_logits(model, batches, transform, device, amp_dtype(device), channels_last=device.type == "cuda", tta=tta)
    assert torch.equal(index, torch.arange(len(dataset))), "predictions must come back in dataset order"
    return logits


def require(module: str, pip_spec: str, flag: str) -> None:
    """Stop before any work when an optional feature's package is missing, with the line that installs it."""
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"error: {flag} needs the {module} package, which is not installed: pip install {pip_spec}")


def run_name_of(checkpoint_path: str) -> str:
    """checkpoints/resnet50/best.pt -> resnet50"""
    return os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path)))


def checkpoint_data_root(checkpoint: dict, given: str | None) -> str:
    """The --data-root given, else the one the run was trained on, else data/."""
    return given or (checkpoint.get("args") or {}).get("data_root") or "data"
