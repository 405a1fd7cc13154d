"""Thread budgets: applied inside the block (torch, OpenMP, BLAS), restored after it, overridable."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from xferkit.core import threads
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT
from xferkit.core.threads import THREADS_ENV, thread_budget, thread_count


def _pools() -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for pool in threadpool_info():
        found.setdefault(pool["user_api"], set()).add(pool["num_threads"])
    return found


def test_budget_is_applied_inside_and_restored_after(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    torch.set_num_threads(2)
    before = _pools()
    with thread_budget(decode_workers=1) as n:
        assert n == 2 and torch.get_num_threads() == 2
        assert _pools().get("blas", {1}) == {1} and _pools().get("openmp", {2}) == {2}
    with thread_budget(threads=1):
        assert torch.get_num_threads() == 1 and _pools().get("openmp", {1}) == {1}
    assert torch.get_num_threads() == 2 and _pools() == before


def test_budget_is_restored_when_the_block_raises():
    before = torch.get_num_threads(), _pools()
    with pytest.raises(ValueError), thread_budget(threads=1):
        raise ValueError("a fit that fails")
    assert (torch.get_num_threads(), _pools()) == before


def test_cores_minus_workers_or_the_environment(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert thread_count(2) == 6 and thread_count(8) == 1 and thread_count() == 8
    monkeypatch.setenv(THREADS_ENV, "3")
    assert thread_count(2) == 3
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(XferkitError, match=THREADS_ENV):
            thread_count()


def test_head_fits_run_within_the_budget(monkeypatch):
    from xferkit.model.models import _timed_fit

    class Recorder:
        name = "recorder"

        def fit(self, X, y, progress=None):
            self.inside = torch.get_num_threads(), _pools().get("blas", {1})

    monkeypatch.setenv(THREADS_ENV, "1")
    before = torch.get_num_threads()
    head = Recorder()
    _timed_fit(head, np.zeros((4, 2)), np.zeros(4), SILENT)
    assert head.inside == (1, {1}) and torch.get_num_threads() == before


def test_a_cpu_backbone_keeps_every_core_and_a_gpu_one_leaves_them_to_the_decoders(monkeypatch):
    from xferkit.core.threads import workers_to_spare

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("xferkit.core.threads.available_cores", lambda: 8)
    assert thread_count(workers_to_spare("cpu", 3)) == 8
    assert thread_count(workers_to_spare("cuda", 3)) == 5
