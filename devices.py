"""Where the scripts run: the device, its precision, and what every script's --device and --workers accept."""
from __future__ import annotations

import ctypes
import os
import platform
from contextlib import nullcontext

import torch

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

    By default glibc maps every block over 32 MB (a float batch, an activation at 350 px) afresh and unmaps it when
    freed, so each step pays a page fault per 4 KB it writes (BENCHMARKS.md gives what keeping it saves). jemalloc
    and tcmalloc, which PyTorch's CPU performance guide suggests, do the same. Nothing changes on a GPU or without glibc.
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
