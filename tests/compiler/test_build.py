"""Sizing and initializer together: a combination that cannot fill the experts is refused with both named;
which built blocks are compared with their dense FFN."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import mixcompile as mc
from mixcompile.compiler import Recipe, convert, find_sites, inspect
from mixcompile.compiler.build import build_replacement, function_preserving
from mixcompile.errors import ConfigError, VerificationError
from mixcompile_plugins.routers import ExpertChoiceRouter, HashRouter, SwitchRouter, TopKRouter


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


# -- which blocks are compared with their FFN: facts about the built block, not plugin names ---------------


class _SumsToOne(mc.LearnedRouter):
    """A third party's top-k router (softmax over the k picks), promising weights that sum to 1."""

    weights_sum_to_one = True

    def forward(self, x: torch.Tensor, kernel: mc.Kernel) -> mc.RoutingPlan:
        logits = self.logits(x)
        chosen = self.select(logits)
        return self.token_choice_plan(logits, chosen, torch.softmax(logits.gather(-1, chosen), dim=-1))


class _BrokenPromise(_SumsToOne):
    """Says its weights sum to 1, gives each token half of that."""

    def forward(self, x: torch.Tensor, kernel: mc.Kernel) -> mc.RoutingPlan:
        logits = self.logits(x)
        chosen = self.select(logits)
        return self.token_choice_plan(logits, chosen, torch.full(chosen.shape, 0.5 / self.top_k))


def _copy_dense(experts, dense, *, generator=None) -> None:
    """A third party's initializer that copies the FFN into every expert, as 'upcycle' does."""
    for name in ("w_in", "w_out", "b_in", "b_out"):
        getattr(experts, name).copy_(getattr(dense, name).unsqueeze(0).expand_as(getattr(experts, name)))


class _LooksAhead(_SumsToOne):
    """Says its routing depends on later positions, as expert choice's does."""

    causal = False


class _Plugins:
    @mc.hookimpl
    def register_routers(self, register: mc.RouterRegister) -> None:
        register("sums_to_one", _SumsToOne)
        register("broken_promise", _BrokenPromise)
        register("looks_ahead", _LooksAhead)

    @mc.hookimpl
    def register_initializers(self, register: mc.InitializerRegister) -> None:
        register("copy_dense", _copy_dense)


def test_a_third_party_router_promising_weights_that_sum_to_one_is_verified(fresh_registry) -> None:
    mc.register_plugin(_Plugins(), name="tests.verify")
    x = torch.randn(2, 5, 16)
    for recipe in (
        {"router": "sums_to_one"},
        {"init": "copy_dense"},
        {"router": "sums_to_one", "init": "copy_dense"},
    ):
        _, report = mc.convert_with_report(mlp(), num_experts=4, example_inputs=x, **recipe)
        assert report.sites[0].max_error is not None and report.sites[0].max_error < 1e-5, recipe
        assert report.model_max_error is not None and report.model_max_error < 1e-5, recipe


def test_a_third_party_router_that_is_not_causal_is_warned_about_on_a_model_that_generates(
    fresh_registry,
) -> None:
    """The warning was for the router named 'expert_choice'; now for any router whose ``causal`` is False."""
    mc.register_plugin(_Plugins(), name="tests.verify")
    with pytest.warns(UserWarning, match=r"router 'looks_ahead' is not causal: in TinyGPT"):
        mc.convert(mc.build_tiny_gpt(), num_experts=4, router="looks_ahead")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is not causal")
        mc.convert(mc.build_tiny_gpt(), num_experts=4, router="sums_to_one")
        mc.convert(mlp(), num_experts=4, router="looks_ahead")  # generates nothing


def test_a_router_breaking_its_promise_is_refused_and_the_model_left_as_it_was(fresh_registry) -> None:
    mc.register_plugin(_Plugins(), name="tests.verify")
    model, x = mlp(), torch.randn(2, 5, 16)
    said = r"FFN site 0 at '<root>' \(chain_collapse: 0 <- block; identity: 1, 2\): .* should compute"
    with pytest.raises(VerificationError, match=said):  # the site and its rewrite
        mc.convert(model, num_experts=4, router="broken_promise", example_inputs=x, inplace=True)
    assert isinstance(model[0], torch.nn.Linear)


@pytest.mark.parametrize(
    ("router", "options", "promised"),
    [
        (TopKRouter, {}, True),
        (TopKRouter, {"order": "topk_softmax"}, True),
        (TopKRouter, {"renormalize": False}, False),
        (TopKRouter, {"capacity_factor": 1.0}, False),
        (HashRouter, {}, True),
        (HashRouter, {"capacity_factor": 2.0}, False),
        (SwitchRouter, {}, False),
        (ExpertChoiceRouter, {}, False),
    ],
)
def test_the_built_in_routers_say_whether_their_weights_sum_to_one(router, options, promised) -> None:
    top_k = 1 if router is SwitchRouter else 2
    assert router(16, 4, top_k, **options).weights_sum_to_one is promised
    assert mc.RouterBase(16, 4, 2).weights_sum_to_one is False


def test_a_block_is_function_preserving_only_while_every_expert_copies_the_ffn() -> None:
    site = find_sites(mlp()).sites[0]
    plan = build_replacement(site, Recipe(num_experts=4, num_shared_experts=1))
    assert function_preserving(plan)
    with torch.no_grad():
        plan.block.experts.w_in[3, 0, 0] += 1.0  # the last expert only
    assert not function_preserving(plan)
    plan = build_replacement(site, Recipe(num_experts=4, num_shared_experts=1))
    with torch.no_grad():
        plan.block.shared_experts.b_out[0, 0] = 1.0  # shared experts that add something
    assert not function_preserving(plan)
    for recipe in (
        Recipe(num_experts=4, init_options={"noise": 0.1}),
        Recipe(num_experts=4, router="switch", top_k=1),
    ):
        assert not function_preserving(build_replacement(site, recipe))
