"""Thread budgets: how many threads torch, OpenMP and BLAS may start while xferkit computes.

Left alone, each library starts one thread per core and they spin against each other and the
decode workers: on 2 cores the lr fit on sample_data took 10 s (136 s on a loaded machine)
instead of 1.2 s with one thread. numpy's and scipy's BLAS get one thread: xferkit hands them
only small problems (large ones run in torch), where OpenBLAS threads cost 40x the CPU time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

from xferkit.core.devices import available_cores
from xferkit.core.errors import XferkitError

#: Environment variable that overrides the computed budget (a positive integer).
THREADS_ENV = "XFERKIT_THREADS"


def thread_count(decode_workers: int = 0) -> int:
    """Compute threads: ``$XFERKIT_THREADS`` if set, else the cores the decode workers leave (>= 1)."""
    given = os.environ.get(THREADS_ENV, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise XferkitError(f"{THREADS_ENV}={given!r} is not a positive whole number of threads; "
                               f"set it to e.g. 2, or unset it to use the core count.")
        return int(given)
    return max(1, available_cores() - decode_workers)


def workers_to_spare(device_type: str, decode_workers: int) -> int:
    """Cores to leave the decode workers while a backbone runs on *device_type*.

    On the CPU a JPEG decodes in a few ms against ~100 ms of forward pass, so the workers mostly
    wait and the backbone gets every core (measured on 2 cores: mobilenet_v2 extracts 1.6x faster
    than with one core left to the worker); with a GPU running the backbone the
    CPU's work is the decoding, and the workers get their cores.
    """
    return 0 if device_type == "cpu" else decode_workers


@contextmanager
def thread_budget(decode_workers: int = 0, threads: int | None = None) -> Iterator[int]:
    """Within the block torch and OpenMP use *threads* (default :func:`thread_count`), BLAS one;
    the previous settings are restored afterwards. Yields the thread count."""
    n = threads or thread_count(decode_workers)
    before = torch.get_num_threads()
    with threadpool_limits(limits=n, user_api="openmp"), threadpool_limits(limits=1, user_api="blas"):
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            torch.set_num_threads(before)
