"""Pick the compute device and a thread budget that does not oversubscribe small machines."""

from __future__ import annotations

import os

import torch

from xferkit.errors import XferkitError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XferkitError("--device cuda was asked for but no CUDA GPU is visible to torch. "
                           "Use --device cpu, or check the driver (and `docker run --gpus all`).")
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise XferkitError(f"unknown device {name!r}; use auto, cpu or cuda.")
    return torch.device(name)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """Image-decoding worker processes for a DataLoader on *device*."""
    cores = available_cores()
    if device.type == "cuda":
        return min(cores, 16)
    return 0 if cores <= 2 else min(cores // 2, 8)
