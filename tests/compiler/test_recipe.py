"""Recipes (serialisation, site selection, options) and the inspect report."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from zoo import ZOO, build

from mixcompile import build_tiny_gpt
from mixcompile.compiler import Recipe, convert, convert_with_report, inspect, recipes_of
from mixcompile.errors import ConfigError
from mixcompile.runtime.blocks import MoEBlock, MoTBlock


def test_recipe_round_trips_through_json() -> None:
    recipe = Recipe(
        strategy="mot",
        num_experts=16,
        group_size=8,
        mixer_options={"temperature": 0.5},
        init="split",
        init_options={"method": "balanced"},
        sizing="flop",
        sites=[0, 3],
        seed=3,
    )
    data = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(data) == recipe


def test_filter_fn_is_not_serialised() -> None:
    recipe = Recipe(filter_fn=lambda module, fqn: "layers.1" in fqn)
    assert "filter_fn" not in recipe.to_dict()
    assert Recipe.from_dict(recipe.to_dict()).filter_fn is None


@pytest.mark.parametrize(
    ("sites", "expected"),
    [("all", [0, 1, 2, 3]), ("last_half", [2, 3]), ("every:2", [1, 3]), ([0, -1], [0, 3])],
)
def test_site_selection(sites: object, expected: list[int]) -> None:
    report = inspect(build("t5"), sites=sites)
    assert [s.index for s in report.sites if s.status == "planned"] == expected


def test_filter_fn_narrows_the_selection() -> None:
    report = inspect(build("t5"), filter_fn=lambda module, fqn: fqn.startswith("decoder"))
    assert [s.status for s in report.sites] == ["not selected"] * 2 + ["planned"] * 2


def test_only_selected_sites_are_converted() -> None:
    model = build("llama")
    converted = convert(model, sites=[1], num_experts=4)
    assert not isinstance(converted.model.layers[0].mlp, MoEBlock)
    assert isinstance(converted.model.layers[1].mlp, MoEBlock)


def test_recipe_and_keyword_options_combine() -> None:
    recipe = Recipe(num_experts=4, top_k=1)
    converted = convert(build("llama"), recipe, top_k=2)
    assert converted.model.layers[0].mlp.top_k == 2 and converted.model.layers[0].mlp.router.num_experts == 4


def test_unknown_option_lists_valid_ones_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'num_expert'.*'num_experts'.*Valid options"):
        convert(build("llama"), num_expert=4)


@pytest.mark.parametrize(
    "options", [{"strategy": "moo"}, {"sizing": "tiny"}, {"sites": "first_half"}, {"num_experts": 0}]
)
def test_bad_recipe_values(options: dict) -> None:
    with pytest.raises(ConfigError):
        Recipe(**options)


@pytest.mark.parametrize(
    ("field", "typo", "suggestion"),
    [
        ("strategy", "mox", "mot"),
        ("sizing", "flops", "flop"),
        ("strategy", "MoE", "moe"),
        ("layout", "FLAT", "flat"),
    ],
)
def test_misspelt_strategy_or_sizing_suggests_the_closest(field: str, typo: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown {field} '{typo}'. Did you mean '{suggestion}'"):
        Recipe(**{field: typo})


def test_sizing_split_and_flop() -> None:
    split = inspect(build("llama"), num_experts=4, init="split")
    assert {s.expert_hidden for s in split.sites} == {16}
    flop = inspect(build("llama"), strategy="mot", num_experts=8, group_size=4, sizing="flop", init="random")
    assert {s.expert_hidden for s in flop.sites} == {32}
    assert flop.ffn_flops_after > flop.ffn_flops_before  # mixing adds a little on top of the matched experts


def test_inspect_reports_sites_untraced_modules_and_costs_without_changing_anything() -> None:
    model = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = inspect(model, num_experts=4)

    assert [s.status for s in report.sites] == ["planned", "planned"]
    site = report.sites[0]
    assert site.path == "encoder.layer.0"
    assert (site.d_model, site.d_hidden, site.activation) == (32, 64, "gelu")
    assert site.rewrite.startswith("chain_collapse: encoder.layer.0.intermediate.dense")
    assert "encoder.layer.0.attention.self" in report.untraced
    assert report.params_after > report.params_before
    text = str(report)
    assert "encoder.layer.0.intermediate.dense" in text and "Modules not traced" in text
    json.dumps(report.to_dict())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_inspect_param_count_matches_conversion() -> None:
    model = build("gpt2")
    planned = inspect(model, num_experts=4, num_shared_experts=1)
    _, report = convert_with_report(model, num_experts=4, num_shared_experts=1)
    assert planned.params_after == report.params_after
    assert sum(p.numel() for p in _.parameters()) == report.params_after


def test_verification_reports_errors_from_real_inputs() -> None:
    inputs = ZOO["gpt2"].inputs(2, 5)
    _, report = convert_with_report(build("gpt2"), num_experts=4, example_inputs=inputs)
    assert all(s.probe == "example_inputs" and s.max_error < 1e-5 for s in report.sites)
    assert report.model_max_error is not None and report.model_max_error < 1e-4
    _, built = convert_with_report(build("gpt2"), num_experts=4)  # a Hugging Face model: inputs built for it
    assert all(s.probe == "inputs built from the model" and s.max_error < 1e-5 for s in built.sites)
    assert built.model_max_error is not None and built.model_max_error < 1e-4
    _, random_probe = convert_with_report(build("plain_mlp"), num_experts=4)  # says nothing of its inputs
    assert all(s.probe == "random" and s.max_error < 1e-5 for s in random_probe.sites)
    _, mot = convert_with_report(build("gpt2"), strategy="mot", num_experts=4, example_inputs=inputs)
    assert all(s.max_error is None for s in mot.sites)  # MoT is not function-preserving: nothing to compare


def test_inplace_conversion_returns_the_same_object() -> None:
    model = build("llama")
    assert convert(model, inplace=True, num_experts=4) is model
    assert isinstance(model.model.layers[0].mlp, MoEBlock)


@pytest.mark.parametrize("function", [convert, convert_with_report])
@pytest.mark.parametrize("keyword", ["inplace", "verify"])
def test_flag_keywords_must_be_bools(function, keyword: str) -> None:
    """inplace="no" is truthy: taken as given, it converted the caller's model in place."""
    model = build("llama")
    with pytest.raises(ConfigError, match=rf"{keyword} must be True or False, got 'no' \(str\)"):
        function(model, num_experts=4, **{keyword: "no"})
    assert not isinstance(model.model.layers[0].mlp, MoEBlock)


@pytest.mark.parametrize("data", [[1], None, "moe", 3])
def test_a_recipe_that_is_not_a_mapping_is_refused_naming_its_type(data: object) -> None:
    with pytest.raises(
        ConfigError, match=f"a recipe must be a mapping of options, got {type(data).__name__}"
    ):
        Recipe.from_dict(data)  # type: ignore[arg-type]


def test_an_option_name_that_is_not_a_string_is_an_unknown_option() -> None:
    with pytest.raises(ConfigError, match="unknown option 1. Valid options"):
        Recipe.from_dict({1: "moe"})  # type: ignore[dict-item]


def test_inspect_of_a_model_without_dense_ffns_has_no_sites_whatever_sites_says() -> None:
    """As with no ``sites``: nothing is left to select from, which is no error."""
    converted = convert(build("llama"), num_experts=4)
    assert inspect(converted, sites=[0]).sites == []


def test_recorded_recipe_replays_the_same_sites() -> None:
    model = build("t5")
    converted = convert(model, num_experts=4, filter_fn=lambda module, fqn: fqn.startswith("decoder"))
    [recorded] = recipes_of(converted)
    assert recorded.sites == [2, 3] and recorded.filter_fn is None
    assert recipes_of(model) == []
    replayed = convert(build("t5"), Recipe.from_dict(json.loads(json.dumps(recorded.to_dict()))))
    assert replayed.state_dict().keys() == converted.state_dict().keys()


def test_a_second_conversion_is_recorded_after_the_first() -> None:
    moe = convert(build("t5"), num_experts=4, sites=[0, 1])
    hybrid = convert(moe, strategy="mot", num_experts=4, group_size=2, init="random", sites="last_half")
    first, second = recipes_of(hybrid)
    assert (first.strategy, first.sites) == ("moe", [0, 1]) and (second.strategy, second.sites) == (
        "mot",
        [1],
    )
    assert len(recipes_of(moe)) == 1  # converting a copy leaves the first model's record alone
    kinds = sorted(type(m).__name__ for m in hybrid.modules() if isinstance(m, MoEBlock | MoTBlock))
    assert kinds == ["MoEBlock", "MoEBlock", "MoTBlock"]


def _stack(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
            for _ in range(layers)
        )
    )


def _routers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        b.router.gate.weight if hasattr(b.router, "gate") else b.router.projection for b in _blocks(model)
    ]


def _blocks(model: torch.nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


@pytest.mark.parametrize("router", ["topk", "hash"])
def test_every_site_draws_its_own_randomness_from_the_recipe_seed(router) -> None:
    """Site seeds are hashed from (seed, site): seed + index made layer 1 of seed 0 draw what layer 0 of
    seed 1 drew, and a second conversion of other layers repeat the first one's; the hash router's table
    ignored the recipe's seed altogether."""
    recipe = {"strategy": "moe", "num_experts": 4, "top_k": 2, "router": router}
    seed0, seed1 = (_routers(convert(_stack(3), **recipe, seed=s)) for s in (0, 1))
    assert not torch.equal(seed0[0], seed1[0])
    assert not torch.equal(seed0[1], seed1[0]) and not torch.equal(seed0[2], seed1[1])
    assert not torch.equal(seed0[0], seed0[1])
    again = _routers(convert(_stack(3), **recipe, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(again, seed0, strict=True))  # still reproducible
    twice = convert(convert(_stack(4), **recipe, sites=[0, 1]), **recipe, sites=[0, 1])
    first, second = _routers(twice)[:2], _routers(twice)[2:]
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_expert_choice_on_a_model_that_generates_is_warned_about() -> None:
    """Expert choice is not causal: on a decoder, generate() would compute what training never saw."""
    with pytest.warns(UserWarning, match=r"router 'expert_choice' is not causal: in LlamaForCausalLM"):
        convert(build("llama"), strategy="moe", num_experts=4, top_k=2, router="expert_choice")
    # not only transformers' models: any with a generate method (mixcompile's own tiny GPT, say)
    with pytest.warns(UserWarning, match=r"router 'expert_choice' is not causal: in TinyGPT") as said:
        convert(build_tiny_gpt(), strategy="moe", num_experts=4, top_k=2, router="expert_choice")
    assert [w.filename for w in said] == [__file__]  # the caller's line, not convert's
    encoder = build("bert")  # an encoder: nothing generates, so nothing to warn about
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is not causal")
        convert(encoder, strategy="moe", num_experts=4, top_k=2, router="expert_choice")


def test_expert_choice_flops_count_the_pairs_its_capacity_gives() -> None:
    """Expert choice runs capacity_factor * top_k pairs per token (the report assumed top_k)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    options = {"num_experts": 4, "top_k": 1, "router": "expert_choice", "init": "random"}
    one, two = (
        inspect(model, **options, router_options={"capacity_factor": cf}).ffn_flops_after for cf in (1.0, 2.0)
    )
    expert = 2 * 16 * 64 * 2
    assert two - one == expert
    # the converted model's report counts its existing block as the plan did (it counted top_k)
    converted = convert(model, **options, router_options={"capacity_factor": 2.0})
    assert inspect(converted).ffn_flops_before == two
    # an expert takes a token once: at most num_experts per token, however large the capacity
    wide = {**options, "top_k": 2, "router_options": {"capacity_factor": 3.0}}
    capped = inspect(model, **wide).ffn_flops_after
    assert capped == one + 3 * expert  # four experts, not six
    assert inspect(convert(model, **wide)).ffn_flops_before == capped
    block = convert(model, **wide)[0].train()
    block(torch.randn(10, 16))
    assert block.router.experts_per_token == int(block.last_stats["expert_load"].sum()) / 10 == 4
    with pytest.raises(ConfigError, match=r"sizing 'flop' divides .* 1.5 here"):
        inspect(model, **options, sizing="flop", router_options={"capacity_factor": 1.5})


@pytest.mark.parametrize(
    "recipe",
    [
        {"sizing": "flop", "top_k": 2},  # upcycle copies the dense FFN: its hidden size must stay
        {"init": "split", "sizing": "same"},
        {"init": "split", "init_options": {"method": "bogus"}},
        {"init_options": {"noise": -1}},
    ],
)
def test_inspect_refuses_what_convert_refuses(recipe) -> None:
    """inspect said 'planned' for these: the initializer's own checks now run on its meta blocks."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    with pytest.raises(ConfigError) as converting:
        convert(model, **recipe)
    with pytest.raises(ConfigError) as inspecting:
        inspect(model, **recipe)
    assert str(inspecting.value) == str(converting.value)


def test_inspect_plans_a_balanced_split_without_clustering_on_meta() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    report = inspect(model, init="split", init_options={"method": "balanced"}, num_experts=4)
    assert [s.status for s in report.sites] == ["planned"]


class _SharedLayers(torch.nn.Module):
    """ALBERT's layout: one layer's FFN runs at every depth (``chunks`` > 1 applies it chunk by chunk over
    the tokens, as transformers' ``chunk_size_feed_forward`` does: still one run over the batch)."""

    def __init__(self, depth: int, chunks: int = 1) -> None:
        super().__init__()
        self.depth, self.chunks = depth, chunks
        self.ffn = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = x + torch.cat([self.ffn(part) for part in x.chunk(self.chunks, dim=1)], dim=1)
        return x


@pytest.mark.parametrize("chunks", [1, 4])
def test_a_shared_ffn_counts_once_per_layer_it_runs_in(chunks) -> None:
    """The report counted a site's FLOPs once though its module runs at every depth (ALBERT): convert,
    which runs the model, counts each run over the batch; inspect, which does not, counts one."""
    x = torch.randn(2, 8, 16)
    model = _SharedLayers(depth=3, chunks=chunks)
    options = {"strategy": "moe", "num_experts": 4, "top_k": 2}
    once = inspect(model, **options)
    _, report = convert_with_report(model, **options, example_inputs=(x,))
    assert (report.ffn_flops_before, report.ffn_flops_after) == (
        3 * once.ffn_flops_before,
        3 * once.ffn_flops_after,
    )
    assert report.ffn_flops_before == 3 * 2 * 2 * 16 * 64
    assert "runs 3 times per forward" in report.sites[0].notes


def test_none_options_mean_no_options() -> None:
    """As the blocks take them (MoEBlock(router_options=None)): convert(router_options=None) was refused."""
    recipe = Recipe(strategy="moe", router_options=None, init_options=None)
    assert recipe.router_options == {} and recipe.init_options == {}
    assert Recipe(strategy="mot", mixer_options=None).mixer_options == {}
