"""Checkpoints: written atomically, read back with weights_only=True, and the run folders that hold them."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

from dataloader import Preprocess
from files import atomic_write
from resnet import MODELS, ResNet, build_model

CHECKPOINT_KEYS = ("model", "model_name", "num_classes", "preprocess", "epoch")


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
