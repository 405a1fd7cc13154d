"""Runs under ``torchrun``: rank and world size from its environment, one process group, bounded collectives.

Without ``torchrun`` (no ``WORLD_SIZE`` above 1) every helper is a no-op on one process, so
library code calls them unconditionally. The group is created on first use, with a timeout on
every collective (``XFERKIT_DIST_TIMEOUT`` seconds), so a rank that dies or hangs makes the
others fail within a bound instead of waiting forever; a failed collective is one
:class:`DistributedError`.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from xferkit.core.errors import XferkitError

#: Seconds a collective waits for the other ranks before failing (torch's own default is 30 minutes).
DEFAULT_TIMEOUT = 1800.0
T = TypeVar("T")


class DistributedError(XferkitError):
    """Another rank failed, was killed or stopped answering; this rank stops too."""


def world_size() -> int:
    """Processes in the run (``WORLD_SIZE`` set by torchrun; 1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process prints and writes the artifacts (rank 0)."""
    return rank() == 0


def timeout() -> float:
    """The collective timeout in seconds (``XFERKIT_DIST_TIMEOUT``)."""
    value = os.environ.get("XFERKIT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise XferkitError(f"XFERKIT_DIST_TIMEOUT={value!r} is not a positive number of seconds.")
    return seconds


def init() -> bool:
    """Join the process group when run by torchrun (once); whether this is a multi-process run.

    gloo carries CPU tensors and, with CUDA, NCCL the GPU ones; each rank uses the GPU
    ``LOCAL_RANK`` names, so ``"cuda"`` means this rank's own device.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout()))
    except (RuntimeError, ValueError) as err:  # a rendezvous that never completes, a missing variable
        raise DistributedError(f"cannot join the other torchrun processes: {err}") from None
    atexit.register(destroy)
    return True


def destroy() -> None:
    """Leave the process group (at exit; harmless when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(fn: Callable[[], T]) -> T:
    """Run a collective; a peer's failure or the timeout becomes one clear :class:`DistributedError`."""
    try:
        return fn()
    except RuntimeError as err:  # DistBackendError and gloo's connection errors are RuntimeErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"another rank failed, was killed or did not answer within {timeout():g} s "
            f"(XFERKIT_DIST_TIMEOUT); stopping without saving anything. Features extracted so far are "
            f"in the cache: a re-run resumes from them. ({first})") from None


def all_gather_objects(obj: Any) -> list[Any]:
    """*obj* of every rank, in rank order (``[obj]`` on one process); picklable objects only."""
    if not init():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(gathered, obj))
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank *src*'s *obj* on every rank (*obj* itself on one process)."""
    if not init():
        return obj
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """*tensor* summed over the ranks, in place (unchanged on one process)."""
    if init():
        _collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def raise_together(step: Callable[[], T]) -> T:
    """``step()``; where it raised on any rank, every rank raises (its own error, else the first one's).

    For a step that may fail on some ranks only (rank 0's writes, say) before more collectives: the
    ranks agree on the outcome first, so that none runs on into a collective the others never join.
    """
    try:
        value = step()
    except DistributedError:
        raise
    except Exception as err:
        all_gather_objects(f"rank {rank()}: {type(err).__name__}: {err}")
        raise
    failed = [message for message in all_gather_objects(None) if message]
    if failed:
        raise XferkitError(failed[0])
    return value


def shard(n: int) -> range:
    """This rank's contiguous, balanced share of ``range(n)`` (sizes differ by one at most)."""
    size, here = world_size(), rank()
    return range(n * here // size, n * (here + 1) // size)


def require_one_process(command: str) -> None:
    """Refuse *command* under torchrun: it has not been made rank-aware, and every rank would write."""
    if world_size() > 1:
        raise XferkitError(f"{command} runs in one process: run it without torchrun (its feature extraction "
                           "reuses a cache that a torchrun `xferkit extract` of the same images fills).")
