"""The head registry: what the CLI reads from the heads' source matches what the heads are."""

import pytest

from xferkit.core.errors import InvalidParameter
from xferkit.model.registry import (
    RUN_PARAMS,
    create_head,
    head_class,
    head_names,
    head_params,
    options_of,
    parse_settings,
)


@pytest.mark.parametrize("name", head_names())
def test_declared_parameters_are_the_estimators_own(name):
    declared = {k: p.default for k, p in head_params(name).items()}
    assert declared == head_class(name)().get_params()
    undocumented = [k for k, p in options_of(name).items() if not p.help]
    assert not undocumented
    assert not set(options_of(name)) & RUN_PARAMS


def test_values_take_the_parameters_type():
    assert parse_settings(["lr.C=0.5", "lr.max_iter=50"]) == {"lr": {"C": 0.5, "max_iter": 50}}
    assert parse_settings(["C=none"], head="lr") == {"lr": {"C": None}}
    assert parse_settings(["gp.ard=true", "finetune.unfreeze=2"]) == {"gp": {"ard": True},
                                                                      "finetune": {"unfreeze": 2}}
    for bad, message in [("lr.C", "HEAD.PARAM=VALUE"), ("lr.nope=1", "no parameter"),
                         ("lr.max_iter=many", "not a valid"), ("C=1", "HEAD.PARAM=VALUE")]:
        with pytest.raises(InvalidParameter, match=message):
            parse_settings([bad])


def test_unknown_heads_and_parameters_are_clear():
    with pytest.raises(InvalidParameter, match="the lr head has no parameter unfreeze"):
        create_head("lr", unfreeze="2")
    with pytest.raises(Exception, match="unknown head 'svm'"):
        create_head("svm")
