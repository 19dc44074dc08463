"""FFNs written inline in a layer's forward, next to attention, residuals and dropouts: functional dropout
(``F.dropout(h, p, training=self.training)``), functional and method activations, forwards with extra
arguments and ``**kwargs``. Each is rewritten, the hidden dropout moves into the block, and the layer keeps
its train / eval behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixcompile as mc
from mixcompile.compiler import find_sites
from mixcompile.runtime.blocks import MoEBlock
from mixcompile.runtime.rewritten import EditedForward

D, H = 16, 32
MOE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "upcycle"}


class BartStyleLayer(nn.Module):
    """BART's decoder layer, reduced: an activation module attribute, functional dropouts whose
    probabilities are float attributes, an optional argument with control flow, and ``**kwargs``."""

    def __init__(self, activation_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.fc1 = nn.Linear(D, H)
        self.activation_fn = nn.GELU()
        self.fc2 = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)
        self.dropout, self.activation_dropout = dropout, activation_dropout

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
        hidden_states = hidden_states + self.attn(hidden_states)
        if encoder_hidden_states is not None:
            hidden_states = hidden_states + encoder_hidden_states
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        return self.norm(residual + hidden_states)


class FunctionalLayer(nn.Module):
    """A functional (or method) activation, a literal hidden dropout, a residual dropout and extra
    arguments with defaults: a graph edit."""

    def __init__(self, method: bool, hidden_p: float = 0.0, residual_p: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)
        self.method, self.hidden_p, self.residual_p = method, hidden_p, residual_p

    def forward(self, x, scale: float = 1.0, shift=None):
        h = self.up(x)
        h = h.relu() if self.method else F.gelu(h)
        h = F.dropout(h, self.hidden_p, self.training)
        return x + F.dropout(self.down(h) * scale, p=self.residual_p, training=self.training)


class Stack(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bart_style_layer_collapses_and_keeps_its_hidden_dropout(p):
    torch.manual_seed(0)
    model = Stack(BartStyleLayer(activation_dropout=p), BartStyleLayer(activation_dropout=p)).eval()
    sites = find_sites(model).sites
    assert [s.rewrite.method if s.rewrite else s.reason for s in sites] == ["chain_collapse"] * 2
    converted, report = mc.convert_with_report(model, **MOE)
    assert [b.experts.hidden_dropout for b in _blocks(converted)] == [p, p]
    assert all(layer.activation_dropout == 0.0 for layer in converted.layers)  # the block applies it now
    assert all(layer.activation_dropout == p for layer in model.layers)  # the input model is untouched
    assert all(not site.notes for site in report.sites)  # nothing is dropped, so nothing to warn about
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_shared_dropout_probability_is_not_turned_off():
    """When the FFN's dropout reads the same attribute as the residual dropout, setting it to 0 would
    change the residual path: chain collapse is not used (a graph edit is), and the residual dropout
    stays on in training."""

    class Shared(BartStyleLayer):
        def forward(self, hidden_states, **kwargs):
            residual = hidden_states
            hidden_states = self.activation_fn(self.fc1(hidden_states))
            hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
            hidden_states = F.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
            return residual + hidden_states

    torch.manual_seed(0)
    model = Stack(Shared(dropout=0.1), Shared(dropout=0.0)).eval()
    assert [s.rewrite.method for s in find_sites(model).sites] == ["graph_edit", "chain_collapse"]
    converted = mc.convert(model, **MOE)
    assert [b.experts.hidden_dropout for b in _blocks(converted)] == [0.1, 0.0]
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
        converted.train()
        assert not torch.equal(converted(x), converted(x))


@pytest.mark.parametrize("method", [False, True])
def test_functional_layer_is_graph_edited_and_follows_train_and_eval(method):
    torch.manual_seed(0)
    model = Stack(FunctionalLayer(method), FunctionalLayer(method, hidden_p=0.25, residual_p=0.5)).eval()
    converted = mc.convert(model, **MOE)
    assert [b.experts.hidden_dropout for b in _blocks(converted)] == [0.0, 0.25]
    for layer in converted.layers:  # the same class and object; only its forward is the edited graph
        assert type(layer) is FunctionalLayer and isinstance(layer.forward, EditedForward)
        assert layer.down is None and isinstance(layer.up, MoEBlock)  # the FFN's weights are the block's
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
        converted.train()
        assert not torch.equal(converted(x), converted(x))  # the residual dropout is live in training
        converted.eval()
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert converted.layers[0](x, 2.0).shape == x.shape  # extra arguments still work


def test_hidden_dropout_is_applied_to_the_hidden_activations_in_training():
    """With p = 1 every hidden unit is dropped: dense gives its output bias, and so must the block (a
    dropout applied to the block's output would give 0, a dropped dropout the full FFN)."""
    torch.manual_seed(0)
    model = Stack(BartStyleLayer(activation_dropout=1.0)).train()
    converted = mc.convert(model, **MOE).train()
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
        half = mc.convert(Stack(BartStyleLayer(activation_dropout=0.5)), **MOE).train()
        assert not torch.equal(half(x), half(x))
