"""Hierarchical tracing, the leaf policy, and activation names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import D_FF, D_MODEL, build

from mixcompile.compiler import trace_hierarchy
from mixcompile.compiler.activation_names import module_activation, node_activation
from mixcompile.compiler.linears import is_linear_like, linear_weights
from mixcompile.compiler.trace import helper_methods, trace_module


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return self.fc(x)
        return x


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Untraceable()
        self.proj = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.inner(x))


def test_untraceable_module_is_opaque_in_its_parent_and_reported() -> None:
    result = trace_hierarchy(Host())
    assert set(result.failures) == {"inner"}
    assert "TraceError" in result.failures["inner"]
    (root,) = [u for u in result.units if u.path == ""]
    targets = [n.target for n in root.graph.nodes if n.op == "call_module"]
    assert targets == ["inner", "proj"]


def test_helper_methods_are_traced_when_forward_fails() -> None:
    layer = nn.TransformerEncoderLayer(D_MODEL, 4, D_FF, dropout=0.0, batch_first=True)
    assert "_ff_block" in helper_methods(layer)
    result = trace_hierarchy(nn.Sequential(layer))
    assert "0" in result.failures
    assert {u.label for u in result.units if u.path == "0"} == {"0._sa_block", "0._ff_block"}


def test_leaf_policy_keeps_projections_and_activations_whole() -> None:
    gpt2 = build("gpt2")
    graph, specialised = trace_module(gpt2.transformer.h[0].mlp, set())
    calls = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    assert calls == ["c_fc", "act", "c_proj", "dropout"]
    assert not specialised


class DtypeGuarded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_FF)
        self.down = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.up(x))
        if hidden.dtype != torch.float32:
            hidden = hidden.float()
        return self.down(hidden)


def test_dtype_checks_are_specialised_for_analysis_only() -> None:
    graph, specialised = trace_module(DtypeGuarded(), set())
    assert specialised
    assert [str(n.target) for n in graph.nodes if n.op == "call_module"] == ["up", "down"]
    with pytest.raises(Exception, match="control flow"):
        trace_module(DtypeGuarded(), set(), analysis=False)


def test_conv1d_weights_are_read_transposed() -> None:
    conv = build("gpt2").transformer.h[0].mlp.c_fc
    assert is_linear_like(conv)
    weight, bias = linear_weights(conv)
    x = torch.randn(3, D_MODEL)
    torch.testing.assert_close(F.linear(x, weight, bias), conv(x))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gelu", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_fast", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("quick_gelu", "quick_gelu"),
        ("silu", "silu"),
        ("relu", "relu"),
        ("relu2", "squared_relu"),
        ("mish", None),
    ],
)
def test_hf_activation_modules_are_named(name: str, expected: str | None) -> None:
    from transformers.activations import ACT2FN

    assert module_activation(ACT2FN[name]) == expected


def test_torch_activation_modules_are_named() -> None:
    assert module_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert module_activation(nn.GELU()) == "gelu"
    assert module_activation(nn.SiLU()) == "silu"
    assert module_activation(nn.Softmax(dim=-1)) is None
    assert module_activation(nn.Identity()) is None


class Spellings(nn.Module):
    """The same kind of activation written as a function, a method and a function-valued attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.activation = F.silu

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.gelu(x, approximate="tanh"), torch.relu(x), x.sigmoid(), self.activation(x), x.exp()


def test_functions_methods_and_attributes_are_named() -> None:
    module = Spellings()
    graph, _ = trace_module(module, set())
    names = [node_activation(n, dict(module.named_modules())) for n in graph.nodes if n.op.startswith("call")]
    assert names == ["gelu_tanh", "relu", "sigmoid", "silu", None]
