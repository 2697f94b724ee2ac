"""Checkpoints: written atomically, read back with weights_only=True, and the run folders that hold them."""
from __future__ import annotations

import glob
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

import torch

from dataloader import Preprocess
from files import atomic_write
from resnet import MODELS, ResNet, build_model

CHECKPOINT_KEYS = ("model", "model_name", "num_classes", "preprocess", "epoch")
LOCK_FILE = "train.lock"


class CheckpointError(Exception):
    """A checkpoint that cannot be used here; the message names the file and what to do."""


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


def refuse_other_models(model: str, found: list[tuple[str, str]], advice: str = "") -> None:
    """--model with --checkpoint: every checkpoint, as (path, model name), must be of that model; else one error that
    names each one that is not."""
    others = [f"{path} ({name})" for path, name in found if name != model]
    if others:
        raise CheckpointError(f"--model {model} does not match {', '.join(others)}: pass {model} checkpoints, or drop --model{advice}")


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


def run_name_of(checkpoint_path: str) -> str:
    """checkpoints/resnet50/best.pt -> resnet50"""
    return os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path)))


def checkpoint_data_root(checkpoint: dict, given: str | None) -> str:
    """The --data-root given, else the one the run was trained on, else data/."""
    return given or (checkpoint.get("args") or {}).get("data_root") or "data"


def lock_run_folder(folder: str, resume_command: str) -> RunLock | None:
    """Hold folder/train.lock until unlock_run_folder or the end of this process, so that no other train.py writes this
    run (None where the system has no fcntl: Windows). Another process that holds it raises CheckpointError naming
    it, with what to do (resume_command is how to go on once it is gone).

    A POSIX record lock (lockf): the kernel drops it when its process ends, kill -9 included, and the processes a
    DataLoader forks do not inherit it, so a run killed in any way can be resumed at once."""
    if fcntl is None:
        return None
    created, parent = [], os.path.abspath(folder)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said who it is yet"
        os.close(fd)  # this process held no lock on the file, so closing it frees nothing
        raise CheckpointError(f"{folder} is being trained by another train.py: {holder}. Nothing was written. Wait for it "
                              f"to finish, or stop it and then go on with\n  {resume_command}") from None
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}, since {since} ({command})\n".encode(), 0)
    return RunLock(folder, fd, created)


@dataclass
class RunLock:
    """A run folder locked by lock_run_folder: the lock file's descriptor, and the folders made for it."""

    folder: str
    fd: int
    created: list[str]


def unlock_run_folder(lock: RunLock | None) -> None:
    """Let go of lock_run_folder's lock. A run stopped before it wrote anything (bad data, say) leaves no trace: the
    lock file goes, and the folders made for it too."""
    if lock is None:
        return
    if os.listdir(lock.folder) == [LOCK_FILE]:
        os.remove(os.path.join(lock.folder, LOCK_FILE))
        for folder in lock.created:  # the run folder first, then the parents made for it
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
    os.close(lock.fd)
