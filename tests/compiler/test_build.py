"""Sizing and initializer together: a combination that cannot fill the experts is refused with both named."""

from __future__ import annotations

import copy

import pytest
import torch

from mixcompile.compiler import convert, inspect
from mixcompile.errors import ConfigError


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


WORKING = "init='upcycle' with sizing='same', init='split' with sizing='split', init='random' with any sizing"


@pytest.mark.parametrize(
    ("recipe", "needs"),
    [
        (
            {"sizing": "flop"},
            r"init='upcycle' needs experts of hidden size 64, the dense one \(sizing='same'\)",
        ),
        (
            {"sizing": "flop", "init": "split"},
            r"init='split' needs experts of hidden size 64 / 8 \(sizing='split'\)",
        ),
        ({"sizing": "split"}, r"init='upcycle' needs .* but sizing='split' gives 8"),
        ({"sizing": "same", "init": "split"}, r"init='split' needs .* but sizing='same' gives 64"),
    ],
)
def test_an_initializer_the_sizing_does_not_fit_names_both_and_what_works(recipe, needs) -> None:
    """With sizing='flop' the upcycle error said "use init='split'", which failed next with another size
    error; init='random' is what works (the README's example)."""
    options = {"num_experts": 8, "top_k": 2, **recipe}
    for run in (convert, inspect):
        with pytest.raises(ConfigError, match=rf"{needs}.*Combinations that work: {WORKING}\."):
            run(mlp(), **options)
    convert(mlp(), **{**options, "init": "random"})


def test_flop_sizing_that_keeps_the_dense_size_still_upcycles() -> None:
    """One active expert: the FLOP-matched size is the dense one, which upcycling copies exactly."""
    dense, x = mlp(), torch.randn(3, 16)
    expected = dense(x)
    converted = convert(copy.deepcopy(dense), num_experts=4, top_k=1, sizing="flop")
    torch.testing.assert_close(converted(x), expected)
