"""Router options given to convert: the router's own checks decide, before anything computed from them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mixcompile.compiler import convert, inspect
from mixcompile.errors import ConfigError


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


@pytest.mark.parametrize("value", ["False", "false", 0, None])
def test_an_on_off_option_that_is_not_a_bool_is_refused(value) -> None:
    """``--router-option renormalize=False`` (Python's spelling, not JSON) gave the string "False", which is
    truthy: the router renormalised, and the string was saved in the manifest."""
    with pytest.raises(ConfigError, match=rf"renormalize must be True or False, got {value!r}"):
        convert(mlp(), num_experts=4, top_k=2, router_options={"renormalize": value})


@pytest.mark.parametrize(
    ("factor", "message"),
    [
        (None, "router 'expert_choice' needs a capacity_factor"),
        ("2", "capacity_factor must be a finite number > 0, got '2'. None is dropless."),
        (True, "capacity_factor must be a finite number > 0, got True. None is dropless."),
        (-1.0, "capacity_factor must be a finite number > 0, got -1.0. None is dropless."),
        (math.nan, "capacity_factor must be a finite number > 0, got nan. None is dropless."),
    ],
)
@pytest.mark.parametrize("sizing", [{}, {"sizing": "flop", "init": "random"}])
def test_expert_choice_capacity_factor_is_checked_by_the_router(factor, message, sizing) -> None:
    """The FLOP accounting multiplied by it first: a bare TypeError for None or a string, another option's
    error ("top_k must be >= 1", "sizing 'flop' divides ... nan") for a negative or NaN one."""
    recipe = {"num_experts": 4, "top_k": 2, "router": "expert_choice", **sizing}
    for run in (convert, inspect):
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(mlp(), **recipe, router_options={"capacity_factor": factor})
