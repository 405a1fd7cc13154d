"""Pick the compute device and a thread budget that does not oversubscribe small machines."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def feeding_threads(device: torch.device, workers: int) -> Iterator[None]:
    """While *workers* processes decode for a GPU, the main process only feeds it: it keeps
    the cores the workers leave (its idle intra-op threads would otherwise spin on theirs)."""
    before = torch.get_num_threads()
    if device.type == "cuda":
        torch.set_num_threads(max(1, min(before, available_cores() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
