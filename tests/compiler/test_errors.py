"""Bad input and sites that cannot be rewritten: clear errors, reasons, and models left as they were."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import D_FF, D_MODEL, PlainMLP, Residual, build

from mixcompile.compiler import convert, convert_with_report, find_sites, inspect
from mixcompile.errors import ConfigError, MixcompileError, ShapeError
from mixcompile.runtime.blocks import MoEBlock, MoTBlock
from mixcompile.runtime.rewritten import EditedForward


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(path, type(m)) for path, m in model.named_modules()]


def _same(model: nn.Module, snapshot: tuple[dict, list]) -> bool:
    state, structure = snapshot
    now = model.state_dict()
    return (
        now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
        and [(path, type(m)) for path, m in model.named_modules()] == structure
    )


def test_model_without_ffn_is_a_clear_error_and_unchanged() -> None:
    model = nn.Sequential(nn.Linear(D_MODEL, D_MODEL), nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, D_MODEL))
    snapshot = _snapshot(model)
    with pytest.raises(ConfigError, match="no FFN found in Sequential"):
        convert(model, inplace=True)
    assert inspect(model).sites == []  # inspect describes; only convert insists on something to do
    assert _same(model, snapshot)


def test_non_module_is_a_type_error_with_a_hint() -> None:
    with pytest.raises(TypeError, match="state_dict"):
        convert(build("llama").state_dict())
    with pytest.raises(TypeError, match="pass an instance"):
        convert(nn.Linear)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        inspect("llama")


def test_top_k_above_num_experts_names_the_site() -> None:
    model = build("llama")
    snapshot = _snapshot(model)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp.*top_k=4 is more than num_experts=2"):
        convert(model, num_experts=2, top_k=4, inplace=True)
    assert _same(model, snapshot)
    # inspect too, in the one wording (the router's; the command line names its flags in it)
    rule = "top_k=4 is more than num_experts=2: top_k must be <= num_experts (a token cannot use an expert"
    with pytest.raises(ConfigError, match=re.escape(rule)):
        inspect(model, num_experts=2, top_k=4)


@pytest.mark.parametrize(
    ("recipe", "option"),
    [
        ({"strategy": "moe", "init_options": {"noise": "abc"}}, "noise"),
        ({"strategy": "moe", "init": "split", "num_experts": 4, "init_options": {"scale": "abc"}}, "scale"),
        ({"strategy": "moe", "router_options": {"jitter": "abc"}}, "jitter"),
        ({"strategy": "mot", "group_size": 2, "mixer_options": {"init_std": "abc"}}, "init_std"),
        ({"strategy": "mot", "group_size": 2, "mixer_options": {"temperature": "abc"}}, "temperature"),
    ],
)
def test_a_built_in_plugin_option_of_the_wrong_type_is_a_config_error_naming_it(recipe, option) -> None:
    """Not a crash blamed on the plugin ("a bug in the plugin"): the value is the user's to fix."""
    with pytest.raises(ConfigError, match=rf"model\.layers\.0\.mlp.*{option} must be a .*'abc'"):
        convert(build("llama"), **{"num_experts": 2, **recipe})


@pytest.mark.parametrize("block", [MoEBlock(8, 16, 4, top_k=2), MoTBlock(8, 16, 4, group_size=2)])
def test_an_input_in_another_dtype_than_the_weights_is_refused_with_the_remedies(block) -> None:
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(
        ShapeError, match=r"holds torch.float32 weights and got a torch.float64 input.*autocast"
    ):
        block(x)
    assert block.double()(x).dtype == torch.float64  # moved, it runs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the block computes in bfloat16
        assert block.float()(torch.randn(2, 3, 8)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("selection", "said"),
    [
        ({"sites": "every:5"}, "sites='every:5' selects none of the 2 FFN sites of LlamaForCausalLM"),
        ({"sites": []}, "sites=[] selects none of the 2 FFN sites"),
        ({"filter_fn": lambda module, path: False}, "sites='all' with filter_fn selects none of the 2"),
        ({"sites": "last-half"}, "got 'last-half' (the command line's last-half is 'last_half' here)"),
    ],
)
def test_a_selection_of_no_sites_says_so(selection, said) -> None:
    with pytest.raises(ConfigError) as error:
        convert(build("llama"), num_experts=2, **selection)
    assert said in str(error.value)


@pytest.mark.parametrize(
    ("recipe", "said"),
    [
        ({"strategy": "moe", "mixer": "foo"}, "mixer='foo' is a mot option, which a moe recipe does not use"),
        ({"strategy": "moe", "mixer_options": {"temprature": 1}}, "mixer_options={'temprature': 1} is a mot"),
        ({"strategy": "moe", "group_size": 8}, "group_size=8 is a mot option"),
        ({"strategy": "mot", "router": "topkk"}, "router='topkk' is a moe option, which a mot recipe"),
        ({"strategy": "mot", "top_k": 99}, "top_k=99 is a moe option"),
        ({"strategy": "mot", "router_options": {"jitter": 0.1}}, "router_options={'jitter': 0.1} is a moe"),
    ],
)
def test_an_option_of_the_other_strategy_is_refused(recipe, said) -> None:
    """It would do nothing, and be saved in the manifest: a misspelt MoT option on a MoE recipe (or a wrong
    strategy) would pass unnoticed."""
    with pytest.raises(ConfigError) as error:
        convert(build("llama"), num_experts=2, **recipe)
    assert said in str(error.value)


def test_split_that_does_not_divide_names_the_site() -> None:
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.mlp.*not divisible by num_experts=3"):
        convert(build("gpt2"), num_experts=3, init="split")


def test_flop_sizing_that_does_not_divide_names_the_site() -> None:
    with pytest.raises(ConfigError, match=r"layers\.0\.ffn.*flop-matched"):
        convert(build("plain_mlp"), strategy="mot", num_experts=3, group_size=2, sizing="flop", init="random")


def test_site_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        convert(build("llama"), sites=[5])


class InlineRoot(nn.Module):
    """One FFN inline in the model's own forward (a graph edit would change its class), one in a module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D_MODEL, D_FF)
        self.proj = nn.Linear(D_FF, D_MODEL)
        self.block = Residual(PlainMLP())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(F.gelu(self.fc(x)))
        return self.block(x)


def test_unrewritable_site_is_reported_and_left_whole() -> None:
    model = InlineRoot()
    (inline, module) = find_sites(model).sites
    assert inline.rewrite is None and "model's own forward" in inline.reason
    assert module.rewrite is not None

    report = inspect(model)
    assert [s.status for s in report.sites] == ["cannot rewrite", "planned"]
    assert "Sites that cannot be rewritten" in str(report)

    with pytest.warns(UserWarning, match="left dense") as said:
        converted, report = convert_with_report(model, num_experts=4)
    assert {w.filename for w in said} == {__file__}  # the caller's line
    assert isinstance(converted.fc, nn.Linear) and isinstance(converted.proj, nn.Linear)
    assert isinstance(converted.block.ffn, MoEBlock)
    assert report.sites[0].status == "cannot rewrite" and report.sites[1].status == "converted"


def test_only_unrewritable_sites_selected_is_an_error() -> None:
    with pytest.raises(ConfigError, match="can be rewritten"):
        convert(InlineRoot(), sites=[0])


class SharedProjection(nn.Module):
    """The up projection is also used by another branch: chain collapse would change that branch."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.act = nn.ReLU()
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x))) + self.up(x).mean(-1, keepdim=True)


def test_module_called_twice_blocks_chain_collapse_but_allows_graph_edit() -> None:
    model = nn.Sequential(SharedProjection())
    (site,) = find_sites(model).sites
    assert site.rewrite.method == "graph_edit"
    converted = convert(model, num_experts=2)
    assert type(converted[0]) is SharedProjection and isinstance(converted[0].forward, EditedForward)
    assert isinstance(converted[0].up, nn.Linear)  # still used by the other branch
    x = torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.down(F.relu(self.up(x)))
        return y * 0.5 if self.training else y


def test_mode_dependent_forward_is_not_graph_edited() -> None:
    (site,) = find_sites(nn.Sequential(ModeDependent())).sites
    assert site.rewrite is None and "train and eval" in site.reason


def test_failed_verification_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama")
    snapshot = _snapshot(model)

    def broken(self: MoEBlock, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1]

    monkeypatch.setattr(MoEBlock, "forward", broken)
    with pytest.raises(MixcompileError, match=r"model\.layers\.0\.mlp"):
        convert(model, inplace=True, num_experts=4)
    assert _same(model, snapshot)


def test_an_ffn_with_weights_in_two_dtypes_is_refused_naming_them():
    """transformers keeps T5's wo in float32 when the model is loaded in float16."""
    pytest.importorskip("transformers")
    model = build("t5").half()
    for module in model.modules():
        if hasattr(module, "wo"):
            module.wo.float()
    with pytest.raises(
        ConfigError, match=r"DenseReluDense: its weights are in float16 and float32.*one dtype"
    ):
        convert(model, strategy="moe", num_experts=4, top_k=2)


def test_a_plugin_error_names_the_site_once() -> None:
    with pytest.raises(ConfigError) as caught:
        convert(build("llama"), strategy="moe", router_options={"bogus": 1})
    message = str(caught.value)
    assert "router 'topk'" in message and "no option 'bogus'" in message
    assert message.count("model.layers.0.mlp") == 1, message


def test_a_generator_in_init_options_is_refused_in_words() -> None:
    with pytest.raises(ConfigError, match="init_options: 'generator' is mixcompile's to give.*seed="):
        convert(build("llama"), strategy="moe", init_options={"generator": torch.Generator()})


@pytest.mark.parametrize("strategy", ["moe", "mot"])
def test_an_empty_example_batch_converts_without_a_comparison(strategy) -> None:
    """Comparing the model's output before and after on a batch of 0 sequences raised a bare RuntimeError
    (a max over no values)."""
    model, report = convert_with_report(
        Residual(PlainMLP()), strategy=strategy, num_experts=4, example_inputs=torch.randn(0, 3, D_MODEL)
    )
    assert report.model_max_error is None and len(report.sites) == 1
    x = torch.randn(4, 3, D_MODEL)
    assert model(x).shape == x.shape
