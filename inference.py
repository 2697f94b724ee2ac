"""Scoring a trained network: logits over batches or a dataset, with flip TTA, and BatchNorm adapted to the images scored."""
from __future__ import annotations

import copy
import sys

import torch
from torch.utils.data import Dataset

from batching import EpochBatchSampler, make_loader
from dataloader import BatchTransform, Preprocess
from devices import amp_dtype, autocast


def network_input(images: torch.Tensor, transform: BatchTransform | None, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch as the network takes it: on the device, transformed (uint8 images; float ones come with transform None),
    in the memory format of the model."""
    x = images.to(device, non_blocking=True)
    x = transform(x) if transform is not None else x
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches, transform: BatchTransform | None, device: torch.device,
                   dtype: torch.dtype | None = None, channels_last: bool = False, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, float32 logits) over batches of (index, image[, label]): uint8 images that transform makes network
    inputs, or float inputs with transform None; with tta, averaged over the 4 flips."""
    model.eval()
    all_index, all_logits = [], []
    for batch in batches:
        index, x = batch[0], network_input(batch[1], transform, device, channels_last)
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

    One pass in training mode, each layer normalising by its batch as in training; the statistics are pooled over
    all images (per channel, not a moving average). The batches should be mixed as training batches were (see
    adapt_to_dataset). Needs no labels; the model given is left as it was.
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
            x = network_input(batch[1], transform, device, channels_last)
            with autocast(device, dtype):
                adapted(x)
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
    """adapt_batchnorm over every image of a uint8 dataset: a copy of model for scoring that dataset.

    The batches are shuffled (seed 0): in the pass each layer normalises by its batch, and a batch of one class or
    one patient, as a CSV sorted by either gives, would hand the deeper layers other inputs than scoring does."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=True, seed=0)
    batches = make_loader(dataset, sampler, workers, device)
    return adapt_batchnorm(model, batches, BatchTransform(preprocess), device, amp_dtype(device), channels_last=device.type == "cuda")


def warn_if_class_balanced(checkpoint: dict, path: str) -> None:
    """--adapt-bn assumes the scored cells hold the class mix of the training batches, which class weights and balanced
    samplers have moved: on the patient folds, adapting such networks at the training cells' class mix cost 0.02 to
    0.15 weighted F1, and networks trained without balancing lost at most 0.02 (EXPERIMENTS.md). Balancing patients
    within a class (subject-only) keeps the class mix."""
    balance = (checkpoint.get("args") or {}).get("class_balance")
    if balance not in (None, "none", "subject-only"):
        print(f"warning: {path} was trained with --class-balance {balance}, which --adapt-bn does not suit: on the patient "
              "folds it cost such networks 0.02 to 0.15 weighted F1. For cells you mean to adapt to, train with "
              "--class-balance none.", file=sys.stderr)


def dataset_logits(model: torch.nn.Module, preprocess: Preprocess, dataset: Dataset, device: torch.device,
                   batch_size: int = 64, workers: int = 2, tta: bool = False) -> torch.Tensor:
    """float32 logits (N, classes) for every item of a uint8 dataset, in dataset order. Never shuffled."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False)
    batches = make_loader(dataset, sampler, workers, device)
    index, logits = predict_logits(model, batches, BatchTransform(preprocess), device, amp_dtype(device), channels_last=device.type == "cuda", tta=tta)
    assert torch.equal(index, torch.arange(len(dataset))), "predictions must come back in dataset order"
    return logits
