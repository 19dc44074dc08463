"""Each option's set of values is written once, as a ``Literal`` (mixcompile.types or the plugin's own), and
everything that checks, lists or encodes the values reads it from there."""

from __future__ import annotations

import argparse
from typing import get_args

import torch
from torch import nn

import mixcompile as mc
from mixcompile.cli.main import STRATEGY_FLAGS, _add_recipe_options
from mixcompile.compiler import recipe as recipes
from mixcompile.compiler.report import ProbeSource, SiteStatus
from mixcompile.runtime.activations import ACTIVATIONS
from mixcompile.runtime.blocks import mot
from mixcompile_plugins import initializers, mixers, routers


def test_the_checked_values_are_the_literals() -> None:
    assert recipes.STRATEGIES == get_args(mc.Strategy) == ("moe", "mot")
    assert get_args(mc.Sizing) == recipes.SIZINGS
    assert recipes.LAYOUTS == ("auto", *get_args(mc.TokenLayout)) == get_args(mc.Layout)  # first the default
    assert recipes.MOT_MODES == mot.MODES == get_args(mc.MoTMode) and recipes.MOT_MODES[0] == "soft"
    assert recipes.SMALL_BATCH_POLICIES == mot.SMALL_BATCH_POLICIES == get_args(mc.SmallBatchPolicy)
    assert get_args(mc.TokenLayout) == mot.LAYOUTS
    assert get_args(routers.TopKOrder) == routers.TOPK_ORDERS
    assert get_args(mixers.EmitMode) == mixers.EMIT_MODES
    assert get_args(initializers.SplitMethod) == initializers.SPLIT_METHODS


def test_the_activations_are_one_list() -> None:
    assert tuple(ACTIVATIONS) == get_args(mc.Activation)


def test_the_triton_activation_codes_follow_the_list() -> None:
    from mixcompile_plugins.triton.activations import CODES

    assert {name: code for code, name in enumerate(get_args(mc.Activation))} == CODES


def test_an_unknown_hf_activation_lists_the_known_ones() -> None:
    from mixcompile.integrations.transformers_experts import _activation

    module = nn.Module()
    module.act_fn = nn.Softplus()
    try:
        _activation(module)
    except mc.ConfigError as exc:
        assert f"({', '.join(get_args(mc.Activation))})" in str(exc)
    else:
        raise AssertionError("Softplus was taken")


def test_report_fields_hold_their_literal_values() -> None:
    dense = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    recipe = {"strategy": "mot", "num_experts": 2, "group_size": 2, "layout": "batch_first"}
    converted, report = mc.convert_with_report(dense, **recipe, example_inputs=torch.randn(2, 3, 8))
    site = report.sites[0]
    assert site.status in get_args(SiteStatus) and site.probe in get_args(ProbeSource)
    assert site.layout in get_args(mc.TokenLayout)
    assert mc.inspect(converted).sparse_blocks[0].kind in get_args(mc.BlockKind)


def test_the_cli_refuses_the_other_strategys_options_of_the_recipe() -> None:
    """The CLI's flags per strategy are the recipe's options per strategy, spelt as the parser's flags."""
    assert {s: tuple(flags) for s, flags in STRATEGY_FLAGS.items()} == recipes.STRATEGY_OPTIONS
    parser = argparse.ArgumentParser()
    _add_recipe_options(parser)
    dests = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    for flags in STRATEGY_FLAGS.values():
        for name, flag in flags.items():
            assert dests[flag] == name
