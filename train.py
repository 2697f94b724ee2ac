"""Train ResNet18/50/152 from scratch on the leukemia cells, on one GPU, several, or the CPU.

    python train.py --model resnet50                      the default recipe (see README: why this one)
    python train.py --model resnet50 --recipe seed        the seed report's settings, to reproduce it
    python train.py --model resnet50 --resume             continue checkpoints/resnet50 from its last.pt
    python train.py --demo                                synthetic data, ResNet18, a few minutes on a laptop
    torchrun --nproc_per_node=4 train.py --model resnet152

A run lives in checkpoints/<run-name>/: last.pt (every epoch), best.pt (best valid accuracy or weighted F1),
history.csv and args.json. Checkpoints are written atomically and hold everything needed to resume exactly;
a new run refuses a folder that already holds one.
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from batching import BalancedBatchSampler, CachedBatches, EpochBatchSampler, EpochStream, RunBatchSampler, make_loader
from checkpoints import CheckpointError, RunLock, load_checkpoint, lock_run_folder, save_checkpoint, unlock_run_folder
from cli import non_negative_float, non_negative_int, out_of_memory_advice, positive_int, require, run_main
from dataloader import COLOR_NORMS, Augment, BatchTransform, Preprocess, RetinopathyLoader
from datatools import parse_cnmc_name
from devices import DEVICES, WORKERS, amp_dtype, autocast, device_name, keep_freed_memory, resolve_device
from files import DataError, DiskFullError, atomic_write, check_both_classes, free_space, megabytes, write_csv_atomic
from inference import predict_logits
from resnet import MODELS, build_model

# The recipes. "default" is this project's (README: "Why the default recipe"); "seed" is the report's.
RECIPES = {
    "default": dict(epochs=100, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                    scheduler="cosine", warmup_epochs=3, label_smoothing=0.1, class_balance="loss", ema=0.999,
                    crop=350, image_size=None, color_norm="dataset", hflip=True, vflip=True, rotation=180.0, scale_jitter=0.1,
                    color_jitter=0.1, hed_jitter=0.2, hue_jitter=0.0, saturation_jitter=0.0, blur=0.0, noise=0.0,
                    mixup_alpha=0.0, cutmix_alpha=0.0),
    "seed": dict(epochs=201, batch_size=64, lr=1e-4, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                 scheduler="none", warmup_epochs=0, label_smoothing=0.0, class_balance="none", ema=0.0,
                 crop=None, image_size=None, color_norm="dataset", hflip=True, vflip=False, rotation=15.0, scale_jitter=0.0,
                 color_jitter=0.0, hed_jitter=0.0, hue_jitter=0.0, saturation_jitter=0.0, blur=0.0, noise=0.0,
                 mixup_alpha=0.0, cutmix_alpha=0.0),
}
SEED_RECIPE_PER_MODEL = {"resnet18": dict(batch_size=64, epochs=201), "resnet50": dict(batch_size=32, epochs=201),
                         "resnet152": dict(batch_size=32, epochs=31)}
DEMO = dict(model="resnet18", data_root=os.path.join("data", "demo"), run_name="demo", epochs=15, batch_size=32,
            lr=0.05, warmup_epochs=1, image_size=64, cache="ram", ema=0.99)
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "ema", "ema_updates", "history", "rng", "args", "best_metric", "best_epoch")
# Flags that a run trained by an earlier train.py did not save, with the value that trained it.
UNSAVED_BEFORE = {"color_norm": "dataset", "tensorboard": False, "hed_jitter": 0.0, "hue_jitter": 0.0, "saturation_jitter": 0.0,
                  "blur": 0.0, "noise": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
# Flags that may differ when a run is resumed; any other flag given with --resume must match the run.
RESUMABLE = {"resume", "epochs", "lr", "workers", "device", "compile", "cache", "print_freq", "data_root", "output_dir", "run_name", "amp",
             "tensorboard"}


def hue_fraction(text: str) -> float:
    """An argparse type: a fraction of the colour circle from 0 to 0.5 (--hue-jitter; 0.5 turns a hue to its opposite)."""
    value = float(text)
    if not 0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 0.5")
    return value


def get_args_parser(add_help: bool = True, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help, **kw)

    def add(*names, **options):
        if suppress_defaults:
            options.pop("default", None)
        parser.add_argument(*names, **options)

    recipe = "(default: from --recipe)"
    add("--model", choices=list(MODELS), default="resnet18", help="network to train (default: resnet18)")
    add("--recipe", choices=list(RECIPES), default="default", help="hyper-parameter set that unset flags come from (default: default)")
    add("--demo", action="store_true", default=False, help="make data/demo if missing and train resnet18 on it at 64 px")
    add("--data-root", default="data", help="dataset folder with train.csv and valid.csv (default: data)")
    add("--epochs", type=positive_int, default=None, help=f"total epochs to train {recipe}")
    add("--batch-size", type=positive_int, default=None, help=f"images per step, per process {recipe}")
    add("--lr", type=float, default=None, help=f"peak learning rate {recipe}")
    add("--optimizer", choices=["sgd", "adam", "adamw"], default=None, help=f"optimizer {recipe}")
    add("--momentum", type=float, default=None, help=f"SGD momentum, Nesterov when > 0 {recipe}")
    add("--weight-decay", type=float, default=None, help=f"weight decay, not applied to norms and biases {recipe}")
    add("--scheduler", choices=["cosine", "step", "plateau", "none"], default=None, help=f"learning-rate schedule {recipe}")
    add("--warmup-epochs", type=float, default=None, help=f"linear warm-up epochs before the schedule {recipe}")
    add("--lr-step", type=positive_int, default=30, help="epochs between x0.1 decays with --scheduler step (default: 30)")
    add("--label-smoothing", type=float, default=None, help=f"cross-entropy label smoothing {recipe}")
    add("--class-balance", choices=["loss", "sampler", "subject", "subject-only", "none"], default=None,
        help="counter the 68/32 ALL/hem split: inverse-frequency loss weights, a class-balanced sampler, or one "
             "balanced by class and, within a class, by patient (C-NMC file names); subject-only balances patients "
             f"within a class and keeps the classes' share; none for cells you will score with --adapt-bn {recipe}")
    add("--ema", type=float, default=None, help=f"decay of an exponential moving average of the weights, 0 for none {recipe}")
    add("--crop", type=non_negative_int, default=None, help=f"side of the centre square kept from each image, px; 0 keeps it whole {recipe}")
    add("--image-size", type=positive_int, default=None, help=f"side the crop is resized to, px; unset keeps the crop's side {recipe}")
    add("--color-norm", choices=list(COLOR_NORMS), default=None,
        help=f"input colour: 'dataset' mean and std alone, or 'cell': each cell's mean colour brought to one reference first, "
             f"so a patient's stain shifts it less {recipe}")
    add("--hflip", action=argparse.BooleanOptionalAction, default=None, help=f"random horizontal flips {recipe}")
    add("--vflip", action=argparse.BooleanOptionalAction, default=None, help=f"random vertical flips {recipe}")
    add("--rotation", type=float, default=None, help=f"random rotation range in degrees, +/- {recipe}")
    add("--scale-jitter", type=float, default=None, help=f"random zoom in [1 - s, 1 + s] {recipe}")
    add("--color-jitter", type=float, default=None, help=f"random per-channel stain and brightness gain in [1 - c, 1 + c] {recipe}")
    add("--hed-jitter", type=float, default=None,
        help=f"HED stain augmentation (Tellez et al. 2019): each stain's amount times [1 - h, 1 + h] plus [-h, h] {recipe}")
    add("--hue-jitter", type=hue_fraction, default=None,
        help=f"random hue shift in [-h, h] of the colour circle, at most 0.5, as torchvision's ColorJitter {recipe}")
    add("--saturation-jitter", type=float, default=None,
        help=f"random saturation factor in [1 - s, 1 + s], as torchvision's ColorJitter {recipe}")
    add("--blur", type=float, default=None, help=f"random Gaussian blur, sigma in [0, b] px of the input size {recipe}")
    add("--noise", type=float, default=None, help=f"random Gaussian pixel noise, std in [0, n] of the 0-255 range {recipe}")
    add("--mixup-alpha", type=non_negative_float, default=None,
        help=f"mix each train batch's images and labels with torchvision's MixUp, weight ~ Beta(a, a); 0 for none {recipe}")
    add("--cutmix-alpha", type=non_negative_float, default=None,
        help=f"paste a box of another image with torchvision's CutMix, Beta(a, a); with --mixup-alpha, one of the two per batch {recipe}")
    add("--best-metric", choices=["acc", "f1"], default="acc", help="what best.pt keeps the best of: valid accuracy or weighted F1 (default: acc)")
    add("--workers", type=non_negative_int, default=WORKERS, help="data-loading processes per GPU (default: min(8, cores))")
    add("--cache", choices=["none", "ram", "gpu"], default="none",
        help="decode the dataset once and keep it as uint8 in RAM or on the GPU (default: none)")
    add("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default: 0)")
    add("--deterministic", action="store_true", default=False, help="deterministic kernels: bit-exact reruns and resumes, slower")
    add("--device", choices=DEVICES, default="auto", help="where to train (default: auto)")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
        help="mixed precision: bf16 on CUDA where supported, else fp16 with a grad scaler; always off on CPU (default: auto)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format (default: on with CUDA)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model: the first epoch compiles it (a minute or two), later ones run faster "
             "(default: on with a CUDA GPU that Triton supports, off elsewhere)")
    add("--output-dir", default="checkpoints", help="folder of run folders (default: checkpoints)")
    add("--run-name", default=None, help="run folder name under --output-dir (default: the model name)")
    add("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
        help="continue the run from its last.pt, or from the checkpoint given")
    add("--tensorboard", action="store_true", default=False,
        help="log each epoch's curves, and the valid confusion matrix when best.pt changes, to <run folder>/tensorboard "
             "(view with: tensorboard --logdir checkpoints)")
    add("--print-freq", type=positive_int, default=50, help="steps between progress updates (default: 50)")
    return parser


def resolve_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """Fill every flag left unset from the recipe (and the demo's settings with --demo)."""
    if args.demo:
        for k, v in DEMO.items():
            if k not in explicit:
                setattr(args, k, v)
    recipe = dict(RECIPES[args.recipe])
    if args.recipe == "seed":
        recipe.update(SEED_RECIPE_PER_MODEL[args.model])
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.run_name = args.run_name or args.model
    args.crop = args.crop or None
    return args


# ----------------------------------------------------------------------------------------------------------
# Processes and reproducibility


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: one process per GPU (NCCL) or per CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(args.device)
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class StopRequest:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks, so a checkpoint is never cut off mid-write."""

    def __init__(self):
        self.signal = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if hasattr(signal, "SIGCHLD"):
            # A SIGTERM to the whole process group ends the DataLoader workers too; PyTorch's SIGCHLD handler
            # would raise about that anywhere, even mid-save. The loop stops before it needs them again.
            signal.signal(signal.SIGCHLD, lambda *_: None)


# ----------------------------------------------------------------------------------------------------------
# Data, model, optimizer


def transforms_from_args(args: argparse.Namespace) -> tuple[Preprocess, Augment]:
    """The run's preprocessing and training augmentation, from its flags."""
    scale = (1 - args.scale_jitter, 1 + args.scale_jitter)
    augment = Augment(hflip=args.hflip, vflip=args.vflip, rotation=args.rotation, scale=scale,
                      stain=args.color_jitter, brightness=args.color_jitter, hed=args.hed_jitter,
                      hue=args.hue_jitter, saturation=args.saturation_jitter, blur=args.blur, noise=args.noise)
    return Preprocess(crop=args.crop, size=args.image_size, color_norm=args.color_norm), augment


def load_data(args: argparse.Namespace, preprocess: Preprocess, augment: Augment, rank: int, world_size: int, device: torch.device):
    """Train and valid batches, iterables of (index, uint8 images, labels); the transform of each (augmented for
    train), which the loop applies on the device; the train sampler; both label lists.

    The train batches are one stream through every epoch (EpochStream), starting at the train sampler's
    epoch: set it before the first epoch when a run resumes.
    """
    train_transform, eval_transform = BatchTransform(preprocess, augment), BatchTransform(preprocess)
    train_set = RetinopathyLoader(args.data_root, "train", preprocess=preprocess, output="uint8")
    valid_set = RetinopathyLoader(args.data_root, "valid", preprocess=preprocess, output="uint8")
    check_both_classes(train_set.label, train_set.csv_path)
    train_sampler = EpochBatchSampler(len(train_set), args.batch_size, shuffle=True, seed=args.seed,
                                            rank=rank, world_size=world_size, drop_last=True)
    if args.class_balance in ("sampler", "subject", "subject-only"):
        by_subject = args.class_balance.startswith("subject")
        subjects = train_subjects(train_set.img_name, train_set.csv_path) if by_subject else None
        train_sampler = BalancedBatchSampler(train_set.label, train_sampler, subjects,
                                             keep_class_mix=args.class_balance == "subject-only")
    valid_sampler = EpochBatchSampler(len(valid_set), args.batch_size * 2, shuffle=False, rank=rank, world_size=world_size)
    run_sampler = RunBatchSampler(train_sampler, args.epochs)
    if args.cache == "none":
        train_batches = make_loader(train_set, run_sampler, args.workers, device)
        valid_batches = make_loader(valid_set, valid_sampler, args.workers, device)
    else:
        cache_device, pin = (device if args.cache == "gpu" else torch.device("cpu")), device.type == "cuda"
        train_batches = CachedBatches(train_set, run_sampler, args.workers, cache_device, pin)
        valid_batches = CachedBatches(valid_set, valid_sampler, args.workers, cache_device, pin)
    train_batches = EpochStream(train_batches, len(train_sampler))
    return train_batches, train_transform, valid_batches, eval_transform, train_sampler, train_set.label, valid_set.label


def train_subjects(paths: list[str], csv_path: str) -> list[str]:
    """The patient of each training cell, from the C-NMC release's file names (UID_<subject>_..., kept by
    dataloader.py --import-cnmc)."""
    subjects = []
    for path in paths:
        parsed = parse_cnmc_name(os.path.basename(path))
        if parsed is None:
            raise DataError(f"{csv_path}: {path} is not named like the C-NMC release (UID_<subject>_<image>_<cell>_"
                            "<all|hem>.bmp), so its patient is unknown; --class-balance subject and subject-only need "
                            "data imported with dataloader.py --import-cnmc. Use --class-balance loss or sampler for "
                            "the course data.")
        subjects.append(parsed[0])
    return subjects


def augment_seed(args: argparse.Namespace, epoch: int, step: int) -> int:
    """The seed of the random augmentation of a train batch: the batch's place in the run (and the process's rank)
    sets it, so a resumed run draws the same as one that never stopped."""
    return (args.seed * 1_000_003 + epoch * 1_009 + args.rank) * 100_003 + step


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """No weight decay on BatchNorm and biases; fused kernels on CUDA where PyTorch has them."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0, **fused)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr, **fused)
    return torch.optim.AdamW(groups, lr=args.lr, **fused)


def lr_factor(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    """The learning rate at a step as a fraction of --lr: linear warm-up, then cosine, step or constant."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.scheduler == "cosine":
        progress = (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if args.scheduler == "step":
        return 0.1 ** (step // steps_per_epoch // args.lr_step)
    return 1.0


def build_scheduler(optimizer, steps_per_epoch: int, args: argparse.Namespace):
    """Stepped every iteration, except plateau, which is stepped each epoch on the valid metric."""
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=10)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))


def set_peak_lr(optimizer: torch.optim.Optimizer, scheduler, lr: float) -> None:
    """Rescale the schedule to a new peak --lr (a resumed run that diverged goes on with a lower one)."""
    for i, group in enumerate(optimizer.param_groups):
        ratio = lr / group.get("initial_lr", group["lr"])
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] = lr
            scheduler.base_lrs[i] = lr


class EMA:
    """An exponential moving average of a model's weights and BatchNorm statistics, warmed up over the first steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        self.decay, self.updates = decay, 0
        for p in self.module.parameters():
            p.requires_grad_(False)
        # The same tensors every step (updated in place by the optimizer and by load_state_dict): listed once,
        # since building a ResNet152's state_dict costs a few milliseconds of the host's time per step.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.averaged = [[e for e, _ in pairs if e.dtype.is_floating_point], [m for e, m in pairs if e.dtype.is_floating_point]]
        self.copied = [[e for e, _ in pairs if not e.dtype.is_floating_point], [m for e, m in pairs if not e.dtype.is_floating_point]]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self.averaged, 1 - d)
        if self.copied[0]:
            torch._foreach_copy_(*self.copied)


class CrossEntropy(torch.nn.Module):
    """torch.nn.CrossEntropyLoss(weight, label_smoothing), mean over the batch, without its host sync.

    With label smoothing PyTorch's mean goes through masked_select, whose output size makes the host wait for
    the GPU at every step. Here each image's loss is summed and divided by the weight of its class instead. Mixed
    labels (class probabilities, from MixUp or CutMix) are divided by their weight in the same way, so that mixing
    leaves the loss's scale as it was; PyTorch divides those by the batch size.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.weight, self.label_smoothing = weight, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = torch.nn.functional.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing,
                                                   reduction="none")
        if self.weight is None:
            return losses.mean()
        return losses.sum() / (self.weight[target] if target.ndim == 1 else target @ self.weight).sum()


def batch_mixing(args: argparse.Namespace) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """torchvision's MixUp and CutMix from --mixup-alpha and --cutmix-alpha, one of the two for each batch when both
    are on, as in torchvision's reference scripts; None when both are 0."""
    if not (args.mixup_alpha or args.cutmix_alpha):
        return None
    from torchvision.transforms import v2  # imported only when used: importing torchvision adds seconds to every start

    mixes = [v2.MixUp(alpha=args.mixup_alpha, num_classes=2)] if args.mixup_alpha else []
    mixes += [v2.CutMix(alpha=args.cutmix_alpha, num_classes=2)] if args.cutmix_alpha else []
    return v2.RandomChoice(mixes)


def build_training(args: argparse.Namespace, device: torch.device, train_labels: list[int], steps_per_epoch: int):
    """The network and what trains it, from the run's flags: (model, channels_last, autocast dtype, optimizer,
    scheduler, grad scaler, EMA or None, loss). benchmark.py times an epoch from the same pieces."""
    model = build_model(args.model, num_classes=2).to(device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, args.amp)
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, steps_per_epoch, args)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    counts = torch.bincount(torch.tensor(train_labels), minlength=2).float()
    weight = (counts.sum() / (2 * counts)).to(device) if args.class_balance == "loss" else None
    criterion = CrossEntropy(weight, args.label_smoothing)
    return model, channels_last, dtype, optimizer, scheduler, scaler, ema, criterion


# ----------------------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(model, ema, batches, transform, optimizer, scheduler, scaler, criterion, epoch, args, device, dtype,
                    channels_last, stop: StopRequest, show: bool) -> dict:
    """Train for one epoch; returns loss, accuracy and images/s (None if stopped by a signal)."""
    model.train()
    generator = torch.Generator()
    mixing = batch_mixing(args)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, steps, start = 0, len(batches), time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", disable=not show or not sys.stderr.isatty(),
               dynamic_ncols=True, leave=False)
    for step, (_, x, y) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        x = transform(x, generator.manual_seed(augment_seed(args, epoch, step)))
        y = target = y.to(device, non_blocking=True)
        if mixing is not None:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator: seeded as the batch
                torch.manual_seed(augment_seed(args, epoch, step))
                x, target = mixing(x, y)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with autocast(device, dtype):
            logits = model(x)
            loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
        if ema is not None:
            ema.update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if (step + 1) % args.print_freq == 0 or step + 1 == steps:
            loss_total, correct_total = torch.stack([loss_sum, correct.float()]).tolist()  # the only host sync
            mean_loss = loss_total / seen
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}")
            rate = seen * args.world_size / (time.perf_counter() - start)
            stats = dict(loss=f"{mean_loss:.4f}", acc=f"{correct_total / seen:.4f}", img_s=f"{rate:.0f}")
            bar.set_postfix(stats, refresh=False)
            if show and bar.disable:
                print(f"  epoch {epoch + 1} step {step + 1}/{steps} " + " ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
        bar.update()
        if stop.signal:
            bar.close()
            return None
    bar.close()
    totals = torch.stack([loss_sum, correct.float(), torch.full((), float(seen), device=device)])
    if args.world_size > 1:
        dist.all_reduce(totals)
    loss_total, correct_total, seen_total = totals.tolist()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_total / seen_total, "train_acc": correct_total / seen_total, "images_per_s": seen_total / seconds,
            "seconds": seconds}


def evaluate(model, batches, transform, criterion, labels: list[int], args, device, dtype, channels_last) -> dict:
    """Valid loss, accuracy and weighted F1 over exactly the valid images, gathered from every process."""
    from sklearn.metrics import confusion_matrix, f1_score  # here, not at the top: it adds seconds to every start

    index, logits = predict_logits(model, batches, transform, device, dtype, channels_last)
    if args.world_size > 1:
        gathered = [None] * args.world_size
        dist.all_gather_object(gathered, (index, logits))
        index, logits = (torch.cat(parts) for parts in zip(*gathered))
    if sorted(index.tolist()) != list(range(len(labels))):
        raise RuntimeError("the valid set was not scored exactly once per image")
    target = torch.tensor(labels)[index]
    pred = logits.argmax(1)
    return {"valid_loss": criterion(logits, target).item(), "valid_acc": (pred == target).float().mean().item(),
            "valid_f1": f1_score(target.numpy(), pred.numpy(), average="weighted", zero_division=0),
            "valid_confusion": confusion_matrix(target.numpy(), pred.numpy(), labels=[0, 1])}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and run files


def run_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, args.run_name)


def make_checkpoint(raw_model, ema, optimizer, scheduler, scaler, epoch, best, history, args, preprocess, augment) -> dict:
    return {
        "model": raw_model.state_dict(), "ema": ema.module.state_dict() if ema else None, "ema_updates": ema.updates if ema else 0,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "best_metric": best["value"], "best_epoch": best["epoch"], "metric": args.best_metric,
        "history": history, "rng": rng_states(), "model_name": args.model, "num_classes": 2,
        "preprocess": preprocess.to_dict(), "augment": augment.to_dict(), "args": vars(args), "format_version": 1,
    }


def best_checkpoint(checkpoint: dict) -> dict:
    """What best.pt keeps of an epoch's checkpoint: the weights it validated (the EMA's, where the run keeps one),
    its preprocessing, history and settings; not the optimizer and RNG states, which only resuming needs."""
    kept = ("epoch", "best_metric", "best_epoch", "metric", "history", "model_name", "num_classes", "preprocess", "augment",
            "args", "format_version")
    return {"model": checkpoint["ema"] or checkpoint["model"], **{k: checkpoint[k] for k in kept}}


def checkpoint_sizes(model: torch.nn.Module, ema: EMA | None, args: argparse.Namespace) -> tuple[int, int]:
    """About how many bytes last.pt and best.pt take: the weights and buffers (twice with an EMA), the optimizer's
    state per parameter (SGD with momentum one buffer, Adam two), and 1 MB for the rest."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = {"sgd": 1 if args.momentum > 0 else 0, "adam": 2, "adamw": 2}[args.optimizer]
    return weights * (2 if ema is not None else 1) + parameters * slots + 2**20, weights + 2**20


def check_free_space(out: str, sizes: tuple[int, int], log: Callable[[str], None]) -> None:
    """Stop before the first epoch when the run folder's disk cannot hold last.pt and best.pt (those already there
    count as held); warn when it cannot also hold the copy of last.pt that replaces it after the next epoch."""
    last, best = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    held = sum(os.path.getsize(p) for p in (last, best) if os.path.isfile(p))
    free = free_space(out)
    if free + held < sum(sizes):
        raise DiskFullError(out, sum(sizes) - held, free, f"last.pt ({megabytes(sizes[0])}) and best.pt ({megabytes(sizes[1])}) "
                            "will not fit. Free some space, or give --output-dir on a disk with room")
    if free + held < sum(sizes) + sizes[0]:
        log(f"warning: {megabytes(free)} free in {out}: room for last.pt and best.pt, but not for the new last.pt that replaces "
            f"the old one after the next epoch ({megabytes(sizes[0])} more): the run will stop there. Free some space first")


def save_epoch(checkpoint: dict, improved: bool, history: list[dict], out: str) -> None:
    """best.pt before last.pt: if the second write fails (a full disk), last.pt never names as best an epoch that
    best.pt does not hold, and a resumed run trains that epoch again and writes best.pt anew."""
    if improved:
        save_checkpoint(best_checkpoint(checkpoint), os.path.join(out, "best.pt"))
    save_checkpoint(checkpoint, os.path.join(out, "last.pt"))
    write_history(os.path.join(out, "history.csv"), history)


def open_tensorboard(out: str, start_epoch: int):
    """A SummaryWriter in out/tensorboard whose steps are epochs. A resumed run first drops whatever was logged after
    its checkpoint's epoch (purge_step), so its curves go on without repeated or orphaned points."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch + 1)


def log_to_tensorboard(writer, row: dict, confusion: np.ndarray | None, run_name: str) -> None:
    """One epoch's history row; the valid confusion matrix too when given (best.pt changed)."""
    for key in ("lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_f1", "images_per_s"):
        writer.add_scalar(key.replace("train_", "train/").replace("valid_", "valid/"), row[key], row["epoch"])
    if confusion is not None:
        from figures import confusion_matrix_figure  # here: matplotlib adds seconds to every start

        title = f"{run_name}, epoch {row['epoch']}: valid acc {row['valid_acc']:.4f}"
        writer.add_figure("valid/confusion_matrix", confusion_matrix_figure(confusion, title), row["epoch"])
    writer.flush()


def write_history(path: str, history: list[dict]) -> None:
    columns = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_f1", "seconds", "images_per_s"]
    write_csv_atomic(path, columns, [[row[c] for c in columns] for row in history])


def check_run_dir_is_free(args: argparse.Namespace) -> None:
    """A new run must not take the folder of an earlier one: its first epoch would overwrite that run's last.pt
    and best.pt, days of training perhaps."""
    last = os.path.join(run_dir(args), "last.pt")
    if not args.resume and os.path.exists(last):
        raise CheckpointError(
            f"{last} exists: {run_dir(args)} holds an earlier run. Continue it with\n"
            f"  python train.py --run-name {args.run_name} --output-dir {args.output_dir} --resume\n"
            "or start a new one with another --run-name (or delete that folder to start it over)")


def hold_run_folder(args: argparse.Namespace) -> RunLock | None:
    """One writer per run: rank 0 locks the run folder (checkpoints.lock_run_folder) and returns the lock; every
    process stops with the same message when another train.py holds it."""
    lock, refusal = None, None
    if args.rank == 0:
        try:
            lock = lock_run_folder(run_dir(args), resume_command(args))
        except CheckpointError as e:
            refusal = str(e)
    if args.world_size > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise CheckpointError(refusal)
    return lock


def resume_command(args: argparse.Namespace) -> str:
    return f"python train.py --run-name {args.run_name} --output-dir {args.output_dir} --resume"


def saved_epoch(args: argparse.Namespace) -> int | None:
    """The epoch the run folder's last.pt holds (read through mmap: its tensors stay on disk), None if it has none."""
    try:
        return int(torch.load(os.path.join(run_dir(args), "last.pt"), map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def how_to_go_on(args: argparse.Namespace, epoch: int | None) -> str:
    """What a run stopped by an error kept (epoch: the one its last.pt holds), and the command that goes on from it."""
    if epoch:
        return f"{os.path.join(run_dir(args), 'last.pt')} holds epoch {epoch}, the last one saved. Go on with\n  {resume_command(args)}"
    if args.resume:
        return f"{args.resume} is as it was. Go on with the same command"
    return "no epoch was saved. Once that is seen to, start the run again with the same command"


def should_compile(args: argparse.Namespace, device: torch.device) -> bool:
    """--compile or --no-compile as given; unset, on where it pays off: a CUDA GPU that Triton can write kernels for
    (Triton installed, which it is not on Windows; compute capability 7.0, Volta, or newer), where it fuses the
    elementwise work between the convolutions (BENCHMARKS.md). Asked for on a GPU it cannot serve, it stops here with
    the reason instead of deep in the compiler at the first step."""
    if device.type != "cuda":
        return bool(args.compile)
    capability = torch.cuda.get_device_capability(device)
    if importlib.util.find_spec("triton") is None:
        unsupported = "Triton, which it needs on a GPU, is not installed (it is not on Windows)"
    elif capability < (7, 0):
        unsupported = (f"it needs a GPU of compute capability 7.0 or newer (Triton's); this "
                       f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    else:
        unsupported = None
    if args.compile and unsupported:
        raise SystemExit(f"error: --compile: {unsupported}. Train without --compile (--no-compile to resume a run that had it)")
    return unsupported is None if args.compile is None else args.compile


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with static shapes: every step's batch has the same shape (drop_last). Left to guess, the
    compiler may re-specialise for dynamic shapes, which can stall it for minutes."""
    return torch.compile(model, dynamic=False)


def resume_checkpoint_path(args: argparse.Namespace) -> str:
    return os.path.join(run_dir(args), "last.pt") if args.resume == "last" else args.resume


def merge_resumed_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """The resumed run's own settings, with only the flags that may change taken from the command line."""
    path = resume_checkpoint_path(args)
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("args") or {}
    if "model" in explicit and args.model != checkpoint["model_name"]:
        raise CheckpointError(f"{path} is a {checkpoint['model_name']} run, not {args.model}: "
                                    f"resume it with --model {checkpoint['model_name']}, or give a new --run-name")
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it can be evaluated, not resumed. "
                                    "Start a new --run-name (or --resume from a last.pt written by this train.py)")
    conflicts = [k for k in explicit - RESUMABLE - {"demo", "recipe", "model"} if k in saved and saved[k] != getattr(args, k)]
    if conflicts:
        raise CheckpointError(
            f"{path} was trained with " + ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in conflicts)
            + ": these cannot change on resume. Drop them to continue the run, or start a new --run-name")
    merged = {**UNSAVED_BEFORE, **saved}
    merged.update({k: getattr(args, k) for k in explicit & RESUMABLE})
    merged["resume"] = path
    return argparse.Namespace(**merged)


# ----------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    if args.tensorboard:
        require("tensorboard", "tensorboard==2.21.0", "--tensorboard")
    if args.hue_jitter or args.saturation_jitter:
        require("kornia", "kornia==0.9.0", "--hue-jitter and --saturation-jitter")
    rank, world_size, device = setup_distributed(args)
    keep_freed_memory(device)
    args.rank, args.world_size = rank, world_size
    lock = hold_run_folder(args)
    try:
        check_run_dir_is_free(args)
        return train(args, device)
    except torch.cuda.OutOfMemoryError:
        epoch = saved_epoch(args)
        problem = out_of_memory_advice(args)
        elsewhere = "\n(a resumed run keeps its --batch-size: a smaller one is a new run, with its own --run-name)" if epoch else ""
    except (DataError, OSError) as e:  # an image that became unreadable, a full disk: the message names the file
        epoch = saved_epoch(args)
        problem = str(e).rstrip(".")
        last = os.path.join(run_dir(args), "last.pt")
        elsewhere = (f"\nonce there is room, or on another disk with\n  python train.py --resume {last} --output-dir OTHER_DISK/checkpoints"
                     if isinstance(e, DiskFullError) and epoch else "")
    finally:
        unlock_run_folder(lock)
    if rank == 0:
        print(f"error: {problem}.\nStopped: {how_to_go_on(args, epoch)}{elsewhere}", file=sys.stderr)
    return 1


def train(args: argparse.Namespace, device: torch.device) -> int:
    """Train the run in its locked folder, epoch after epoch, writing its checkpoints and history; 0 when done, 130 or
    143 when stopped by a signal (after saving the last finished epoch)."""
    rank, world_size = args.rank, args.world_size
    compile_model = should_compile(args, device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    seed_everything(args.seed, args.deterministic)
    if args.demo and is_main and not os.path.isfile(os.path.join(args.data_root, "train.csv")):
        import datatools

        log(f"making the synthetic demo dataset in {args.data_root} (once)")
        datatools.make_demo(args.data_root, workers=os.cpu_count() or 1)
    if world_size > 1:
        dist.barrier()
    stop = StopRequest()

    preprocess, augment = transforms_from_args(args)
    train_batches, train_transform, valid_batches, eval_transform, train_sampler, train_labels, valid_labels = load_data(
        args, preprocess, augment, rank, world_size, device)

    raw_model, channels_last, dtype, optimizer, scheduler, scaler, ema, criterion = build_training(
        args, device, train_labels, len(train_batches))
    eval_criterion = torch.nn.CrossEntropyLoss()

    start_epoch, history, best = 0, [], {"value": -1.0, "epoch": -1}
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint["ema"])
            ema.updates = checkpoint["ema_updates"]
        set_rng_states(checkpoint["rng"])
        if args.lr != checkpoint["args"]["lr"]:
            set_peak_lr(optimizer, scheduler, args.lr)
            log(f"peak learning rate changed from {checkpoint['args']['lr']} to {args.lr}")
        start_epoch, history = checkpoint["epoch"], checkpoint["history"]
        best = {"value": checkpoint["best_metric"], "epoch": checkpoint["best_epoch"]}
        log(f"resumed {args.resume} after epoch {start_epoch}; best valid {args.best_metric} {best['value']:.4f}")

    model = raw_model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        model = compile_for_training(model)

    out = run_dir(args)
    if is_main:
        os.makedirs(out, exist_ok=True)
        for stale in glob.glob(os.path.join(out, ".*.tmp")):  # left by a process killed while saving
            os.remove(stale)
        atomic_write(os.path.join(out, "args.json"), lambda f: f.write(json.dumps(vars(args), indent=2).encode()))
    n_params = sum(p.numel() for p in raw_model.parameters())
    compiling = " (the first epoch compiles it; --no-compile to skip)" if compile_model else ""
    log(f"device {device_name(device)} x {world_size} process(es), precision {dtype or torch.float32}, "
        f"channels_last {channels_last}, compile {compile_model}{compiling}")
    log(f"model {args.model}: {n_params / 1e6:.1f} M parameters; input {preprocess.crop or 'full'} px crop -> "
        f"{preprocess.size or preprocess.crop or 'native'} px")
    log(f"data {args.data_root}: {len(train_labels)} train ({sum(train_labels)} ALL, {len(train_labels) - sum(train_labels)} hem), "
        f"{len(valid_labels)} valid; "
        f"{len(train_batches)} steps of {args.batch_size} x {world_size} per epoch; run folder {out}")

    if is_main:
        check_free_space(out, checkpoint_sizes(raw_model, ema, args), log)
    writer = open_tensorboard(out, start_epoch) if args.tensorboard and is_main else None
    train_sampler.set_epoch(start_epoch)  # the train batches go on from there, epoch after epoch
    for epoch in range(start_epoch, args.epochs):
        lr = optimizer.param_groups[0]["lr"]
        try:
            valid_ahead = iter(valid_batches)  # its workers decode the valid set while this epoch trains
            stats = train_one_epoch(model, ema, train_batches, train_transform, optimizer, scheduler, scaler, criterion,
                                    epoch, args, device, dtype, channels_last, stop, is_main)
            if stats is not None:
                eval_model = ema.module if ema is not None else raw_model
                stats.update(evaluate(eval_model, valid_ahead, eval_transform, eval_criterion, valid_labels, args, device, dtype, channels_last))
        except FloatingPointError as e:
            log(f"error: {e}. Stopped; {os.path.join(out, 'last.pt')} keeps the last good epoch. "
                "Lower --lr, or try --amp off, then --resume.")
            return 1
        except Exception:
            if not stop.signal:
                raise
            stats = None  # a SIGTERM to the whole process group ended the DataLoader workers mid-epoch
        if stats is None:
            break
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(stats["valid_acc"])
        confusion = stats.pop("valid_confusion")
        history.append({"epoch": epoch + 1, "lr": lr, **stats})
        metric = stats["valid_acc" if args.best_metric == "acc" else "valid_f1"]
        improved = metric > best["value"]
        if improved:
            best = {"value": metric, "epoch": epoch + 1}
        if writer is not None:  # before the checkpoint: a run stopped in between logs this epoch again when resumed
            log_to_tensorboard(writer, history[-1], confusion if improved else None, args.run_name)
        if is_main:
            checkpoint = make_checkpoint(raw_model, ema, optimizer, scheduler, scaler, epoch + 1, best, history, args, preprocess, augment)
            save_epoch(checkpoint, improved, history, out)  # a full disk stops the run in main(), with what was kept
        log(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.2e}  train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f}  "
            f"valid loss {stats['valid_loss']:.4f} acc {stats['valid_acc']:.4f} f1 {stats['valid_f1']:.4f}  "
            f"{stats['seconds']:.0f}s {stats['images_per_s']:.0f} img/s" + ("  *best" if improved else ""), flush=True)
        if stop.signal:
            break

    if writer is not None:
        writer.close()
    if stop.signal:
        done = history[-1]["epoch"] if history else start_epoch
        if done == 0:
            log(f"\nstopped by {stop.signal} during the first epoch, before any checkpoint: start the run again with the same command")
        else:
            log(f"\nstopped by {stop.signal} after epoch {done}: {os.path.join(out, 'last.pt')} holds it. Continue with:\n"
                f"  {resume_command(args)}")
        return 130 if stop.signal == "SIGINT" else 143
    log(f"done: best valid {args.best_metric} {best['value']:.4f} at epoch {best['epoch']}; run folder {out}")
    best_pt = os.path.join(out, "best.pt")
    log(f"next:\n  python evaluate.py --checkpoint {best_pt}\n  python plot.py {out}\n  python predict.py --checkpoint {best_pt}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    explicit = set(vars(get_args_parser(add_help=False, suppress_defaults=True).parse_args(argv)))
    if args.resume:
        if args.demo:
            args = resolve_args(args, explicit)
        args.run_name = args.run_name or args.model
        return merge_resumed_args(args, explicit)
    return resolve_args(args, explicit)


if __name__ == "__main__":
    try:
        run_main(main, parse_args)
    finally:
        if dist.is_initialized():  # under torchrun, whatever ended the run
            dist.destroy_process_group()
