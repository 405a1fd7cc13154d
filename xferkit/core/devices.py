"""Pick the compute device and the number of image-decoding workers for it."""

from __future__ import annotations

import os

import torch

from xferkit.core.errors import XferkitError

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
    """Image-decoding worker processes for a DataLoader on *device*.

    On a GPU the CPU only decodes, so every core does. On a CPU the backbone's threads keep all
    cores busy and decoding is a small share of the work (JPEGs decode at reduced size), so a
    quarter of the cores decode, overlapping the backbone instead of taking turns with it.
    """
    cores = available_cores()
    if device.type == "cuda":
        return min(cores, 16)
    return max(1, min(cores // 4, 8))
