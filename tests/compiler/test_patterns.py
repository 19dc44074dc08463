"""FFN patterns: registered as plugins, matched over the typed graph view, weights read canonically."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from zoo import D_FF, D_MODEL, build

import mixcompile.plugins.manager as registry
from mixcompile.compiler import GraphView, Match, convert, find_sites
from mixcompile.compiler.pattern import INPUT
from mixcompile.plugins.hookspecs import hookimpl


def _check_canonical(site_ffn: object, module: nn.Module) -> None:
    x = torch.randn(2, 3, D_MODEL)
    torch.testing.assert_close(site_ffn.forward(x), module(x))


def test_builtin_patterns_register_through_the_hook() -> None:
    names = registry.registry().names("pattern")
    assert {"mlp", "gated_mlp", "fused_gated_mlp"} <= set(names)
    assert registry.lookup("pattern", "mlp").plugin == "mixcompile_plugins.patterns"


def test_fused_gate_up_is_split_in_chunk_order() -> None:
    model = build("phi3")
    (site, _) = find_sites(model).sites
    assert site.pattern == "fused_gated_mlp" and site.ffn.gated
    _check_canonical(site.ffn, model.model.layers[0].mlp)


class Flipped(nn.Module):
    """Gate in the second half of the fused projection, and the product written the other way round."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D_MODEL, 2 * D_FF, bias=bias)
        self.down = nn.Linear(D_FF, D_MODEL, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.gelu(gate))


def test_fused_gate_up_with_gate_second_and_biases() -> None:
    model = nn.Sequential(Flipped(bias=True))
    (site,) = find_sites(model).sites
    assert site.ffn.b_gate is not None and site.ffn.b_out is not None
    _check_canonical(site.ffn, model)


def test_gpt2_conv1d_ffn_is_canonical() -> None:
    model = build("gpt2")
    site = find_sites(model).sites[0]
    assert site.ffn.activation == "gelu_tanh" and site.ffn.has_bias
    _check_canonical(site.ffn, model.transformer.h[0].mlp)


class LeakyHidden(nn.Module):
    """The hidden activation is also returned: replacing the FFN would lose it, so it is no site."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.up(x))
        return self.down(hidden), hidden


def test_inner_nodes_used_outside_the_match_are_not_a_site() -> None:
    assert find_sites(nn.Sequential(LeakyHidden(), nn.Identity())).sites == []


class NoActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * 2)


def test_linear_pairs_without_activation_are_not_a_site() -> None:
    assert find_sites(nn.Sequential(NoActivation())).sites == []


class SquaredReLUPattern:
    """A third-party pattern: ``down(relu(up(x)) ** 2)``, which the built-ins do not know."""

    name = "squared_relu_mlp"

    def find(self, view: GraphView) -> Iterator[Match]:
        for node in view.graph.nodes:
            if node.op != "call_function" or node.target is not torch.square:
                continue
            relu = node.args[0]
            up = view.data_input(relu)
            (down,) = node.users
            if view.kind(up) == view.kind(down) == "linear" and view.activation(relu) == "relu":
                w_in, b_in = view.linear_weights(up)
                w_out, b_out = view.linear_weights(down)
                from mixcompile.runtime.ffn import DenseFFN

                ffn = DenseFFN(w_in, w_out, "squared_relu", b_in=b_in, b_out=b_out)
                x = view.data_input(up)
                roles = {INPUT: x, "up": up, "act": relu, "square": node, "down": down}
                yield Match(self.name, roles, x, down, ffn)


class SquaredMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.square(F.relu(self.up(x))))


class SquaredPlugin:
    @hookimpl
    def register_patterns(self, register: object) -> None:
        register("squared_relu_mlp", SquaredReLUPattern, description="down(relu(up(x))**2)")


def test_third_party_pattern_finds_and_converts() -> None:
    model = nn.Sequential(SquaredMLP())
    assert find_sites(model).sites == []
    registry.register_plugin(SquaredPlugin(), name="squared-test")
    try:
        (site,) = find_sites(model).sites
        assert site.pattern == "squared_relu_mlp" and site.rewrite.method == "module_swap"
        converted = convert(model, num_experts=2, top_k=1)
        x = torch.randn(2, 3, D_MODEL)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x))
    finally:
        registry.unregister_plugin("squared-test")
