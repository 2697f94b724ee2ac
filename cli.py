"""What every script's command line shares: flag types, optional packages, and errors that end a script with a message."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Callable

import torch

from checkpoints import CheckpointError
from devices import DEVICES, WORKERS
from files import DataError


def run_main(main: Callable[[argparse.Namespace], int], parse_args: Callable[[], argparse.Namespace]) -> None:
    """sys.exit(main(parse_args())); a problem with the data, a checkpoint or a file, met while running or while
    reading the flags (train.py's --resume reads the checkpoint), ends the script with its message, no traceback; so
    does running out of GPU memory, with what to try."""
    args = None
    try:
        args = parse_args()
        code = main(args)
    except (DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except torch.cuda.OutOfMemoryError:
        print(f"error: {out_of_memory_advice(args)}", file=sys.stderr)
        code = 1
    sys.exit(code)


def out_of_memory_advice(args: argparse.Namespace | None) -> str:
    """What to say when the GPU runs out of memory: what was in use, and what to try."""
    batch, cache = getattr(args, "batch_size", None), getattr(args, "cache", None)
    in_use = f"with --batch-size {batch}" + (f" and --cache {cache}" if cache else "") if batch else "here"
    tries = [f"--batch-size {max(1, batch // 2)}"] if batch else []
    tries += ["--cache ram instead of gpu"] if cache == "gpu" else []
    return (f"out of GPU memory {in_use}. Try " + (" or ".join(tries) if tries else "a smaller batch")
            + "; another process on the same GPU (nvidia-smi lists them) takes memory too")


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


def non_negative_float(text: str) -> float:
    """An argparse type: a number of at least 0 (--mixup-alpha, where 0 turns it off)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a number of at least 0")
    return value


def add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    """The flags evaluate.py and predict.py share: how a checkpoint scores a set of images, and where."""
    parser.add_argument("--adapt-bn", action="store_true",
                        help="first re-estimate the BatchNorm statistics on the images being scored, in shuffled batches (AdaBN; "
                             "no labels used, the checkpoint is not changed): for cells of new patients, another microscope or "
                             "stain, in a set that holds both classes in about the proportions of training; best with a network "
                             "trained with --class-balance none")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--workers", type=non_negative_int, default=WORKERS, help="data-loading processes (default: min(8, cores))")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")


def require(module: str, pip_spec: str, flag: str) -> None:
    """Stop before any work when an optional feature's package is missing, with the line that installs it."""
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"error: {flag} needs the {module} package, which is not installed: pip install {pip_spec}")
