"""Hostile and damaged inputs through the CLI (the catalogue of benchmarks/hostile.py): each ends in
the exit code it should, never in a traceback; a damaged cache heals to the same predictions."""

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
hostile = importlib.import_module("hostile")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        return hostile.make_world(tmp_path_factory.mktemp("hostile") / "world")


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda c: f"{c.group}: {c.name}")
def test_hostile_input_ends_cleanly(case, world, tmp_path):
    try:
        code, traceback, stderr = hostile.run_case(case, tmp_path / "case", world)
    except OSError as err:
        pytest.skip(f"cannot stage this case here: {err}")
    assert not traceback, stderr
    assert code == case.code, stderr
    if code == 2:  # one error line from xferkit, or typer's usage box for an option out of its range
        assert "\nerror: " in "\n" + stderr or "Usage:" in stderr, stderr
