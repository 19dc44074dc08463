"""FFNs that look dense but are not what their weights say: linear subclasses with their own forward,
computed weights (parametrizations, hooks), clipped activations, hidden dropouts whose ``training`` flag is
not the module's mode, tied weights; and modules the tracer cannot read (TorchScript, uninitialised lazy
ones). Each is left dense with a reason, not matched, or refused with a clear error; never converted into
something that computes another function, never a crash."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as hooked_spectral_norm

import mixcompile as mc
from mixcompile.compiler.activation_names import module_activation
from mixcompile.compiler.linears import is_linear_like
from mixcompile.compiler.trace import helper_methods

D, H = 8, 16
MOE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "upcycle"}


Linear = Callable[[int, int], nn.Module]


class MLP(nn.Module):
    def __init__(self, linear: Linear = nn.Linear, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = linear(D, H), act if act is not None else nn.GELU(), linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Pair(nn.Module):
    """Two residual FFNs: ``a`` plain (the site that converts), ``b`` the one under test."""

    def __init__(self, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = MLP(), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a(x)
        return x + self.b(x)


def _upcycled(model: nn.Module, *, train: bool = False) -> tuple[nn.Module, mc.Report]:
    """``model`` in float64 converted with upcycled experts, both in the same mode."""
    model.double().train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = mc.convert_with_report(model, **MOE)
    return converted.train(train), report


def _assert_same_function(model: nn.Module, converted: nn.Module) -> None:
    """Equal outputs; a dropout left in the dense part draws the same mask in both (same seed)."""
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(2)
        expected = model(x)
        torch.manual_seed(2)
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)


def _statuses(report: mc.Report) -> dict[str, tuple[str, str | None]]:
    return {site.path: (site.status, site.reason) for site in report.sites}


# 1. nn.Linear subclasses that override forward -------------------------------------------------------------


class LoRALinear(nn.Linear):
    """loralib's shape: the dense product plus a low-rank update."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(2, n_in))
        self.lora_b = nn.Parameter(torch.randn(n_out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class PlainSubclass(nn.Linear):
    """Keeps nn.Linear's forward: still a projection."""


def test_linear_subclass_is_linear_like_only_with_the_base_forward() -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear

    assert is_linear_like(nn.Linear(2, 3)) and is_linear_like(PlainSubclass(2, 3))
    assert is_linear_like(FalconLinear(2, 3))  # its own forward, recognised by name: the same product
    assert not is_linear_like(LoRALinear(2, 3)) and not is_linear_like(ScaledLinear(2, 3))


@pytest.mark.parametrize("linear", [LoRALinear, ScaledLinear])
def test_ffn_of_overriding_linears_is_not_converted(linear: type[nn.Linear]) -> None:
    torch.manual_seed(0)
    model = Pair(MLP(linear))
    converted, report = _upcycled(model)
    assert [site.path for site in report.sites if site.status == "converted"] == ["a"]
    assert type(converted.b) is MLP and isinstance(converted.b.fc1, linear)
    _assert_same_function(model, converted)


# 2. Computed weights: parametrizations, old-style hooks, any forward hook -------------------------------


def _scale_output(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output * 3.0


def _hooked(linear: nn.Linear) -> nn.Linear:
    linear.register_forward_hook(_scale_output)
    return linear


WRAPS: dict[str, tuple[Callable[[nn.Linear], nn.Module], str]] = {
    "parametrized weight_norm": (parametrizations.weight_norm, "parametriz"),
    "parametrized spectral_norm": (parametrizations.spectral_norm, "parametriz"),
    "hooked spectral_norm": (hooked_spectral_norm, "SpectralNorm"),
    "forward hook": (_hooked, "_scale_output"),
}


class Stack(nn.Module):
    def __init__(self, wrap: Callable[[nn.Linear], nn.Module], layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MLP(lambda i, o: wrap(nn.Linear(i, o))) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("train", [True, False])
def test_computed_weights_give_one_dense_site_per_ffn_with_the_reason(wrap: str, train: bool) -> None:
    function, why = WRAPS[wrap]
    torch.manual_seed(0)
    model = Stack(function).train(train)
    report = mc.inspect(model)
    assert [site.path for site in report.sites] == [f"layers.{i}" for i in range(3)]  # each FFN once
    for site in report.sites:
        assert site.status == "cannot rewrite"
        assert site.reason is not None and f"{site.path}.fc1" in site.reason and why in site.reason
    with pytest.raises(mc.ConfigError, match="can be rewritten.*layers.0.fc1"):
        mc.convert(model, **MOE)


def test_a_parametrized_ffn_stays_dense_and_the_model_keeps_its_function() -> None:
    torch.manual_seed(0)
    model = Pair(MLP(lambda i, o: parametrizations.weight_norm(nn.Linear(i, o))))
    converted, report = _upcycled(model, train=True)
    assert [(s.path, s.status) for s in report.sites] == [("a", "converted"), ("b", "cannot rewrite")]
    _assert_same_function(model, converted)


# 3. Activations: by class only with the base's forward; the probe reaches far past [-6, 6] -----------------


class ClippedReLU(nn.Module):
    """DeepSpeech's clipped ReLU: a ReLU on [-6, 6]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 20.0)


class CappedReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).clamp(max=1.0)


class MyReLU(nn.ReLU):
    """Keeps nn.ReLU's forward."""


class MyGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def test_modified_activations_are_not_named() -> None:
    assert module_activation(ClippedReLU()) is None
    assert module_activation(CappedReLU()) is None
    assert module_activation(MyReLU()) == "relu"
    assert module_activation(MyGELU()) == "gelu"


def test_hugging_face_activations_keep_their_names() -> None:
    from transformers.activations import ACT2FN

    expected = {
        "gelu": "gelu",
        "gelu_python": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_accurate": "gelu_tanh",
        "quick_gelu": "quick_gelu",
        "relu": "relu",
        "relu2": "squared_relu",
        "silu": "silu",
        "swish": "silu",
        "sigmoid": "sigmoid",
        "tanh": "tanh",
        "gelu_10": None,  # GELU clipped to [-10, 10]: equal to GELU only near 0
    }
    assert {name: module_activation(ACT2FN[name]) for name in expected} == expected


@pytest.mark.parametrize("act", [ClippedReLU, CappedReLU])
def test_ffn_with_a_clipped_activation_is_not_converted(act: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = Pair(MLP(act=act()))
    with torch.no_grad():
        model.b.fc1.weight.mul_(30.0)  # pre-activations past the clip
    converted, report = _upcycled(model)
    assert [site.path for site in report.sites] == ["a"]
    _assert_same_function(model, converted)


# 4. A hidden F.dropout's training flag --------------------------------------------------------------------


class FlaggedDropoutMLP(nn.Module):
    """``training`` is ``self.training``, ``self.training and self.use_dropout``, a constant, or the
    default (``True``)."""

    def __init__(self, flag: str, use_dropout: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.p, self.flag, self.use_dropout = 0.5, flag, use_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        if self.flag == "mode":
            h = F.dropout(h, p=self.p, training=self.training)
        elif self.flag == "and":
            h = F.dropout(h, p=self.p, training=self.training and self.use_dropout)
        elif self.flag == "false":
            h = F.dropout(h, self.p, False)
        else:
            h = F.dropout(h, p=self.p)
        return self.fc2(h)


def _dropout_site(model: nn.Module) -> mc.Report:
    return mc.inspect(model.double(), **MOE)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("flag", ["and", "false"])
def test_a_dropout_that_never_drops_is_no_hidden_dropout(flag: str, train: bool) -> None:
    torch.manual_seed(0)
    model = Pair(FlaggedDropoutMLP(flag, use_dropout=False))
    model.train(train)
    (_, site) = _dropout_site(model).sites
    assert (site.status, site.hidden_dropout) == ("planned", 0.0)
    converted, _ = _upcycled(model, train=True)  # training: the dense model drops nothing, nor may the block
    _assert_same_function(model, converted)


@pytest.mark.parametrize("train", [True, False])
def test_a_dropout_on_self_training_is_the_blocks_hidden_dropout(train: bool) -> None:
    model = Pair(FlaggedDropoutMLP("mode")).train(train)
    (_, site) = _dropout_site(model).sites
    assert (site.status, site.hidden_dropout) == ("planned", 0.5)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    ("flag", "said"), [("and", "training=True in train mode"), ("default", "True in eval")]
)
def test_a_dropout_flag_that_is_not_the_mode_leaves_the_ffn_dense(flag: str, said: str, train: bool) -> None:
    torch.manual_seed(0)
    model = Pair(FlaggedDropoutMLP(flag, use_dropout=True)).train(train)
    (_, site) = _dropout_site(model).sites
    assert site.status == "cannot rewrite" and site.reason is not None
    assert said in site.reason and "not exactly self.training" in site.reason
    converted, _ = _upcycled(model)
    _assert_same_function(model.eval(), converted.eval())


# 5. Tied weights -------------------------------------------------------------------------------------------


def test_an_ffn_tied_to_another_is_reported_as_dense_naming_it() -> None:
    torch.manual_seed(0)
    model = Pair(MLP())
    model.b.fc1.weight, model.b.fc2.weight = model.a.fc1.weight, model.a.fc2.weight
    statuses = _statuses(mc.inspect(model))
    assert statuses["a"][0] == "planned"
    assert statuses["b"][0] == "cannot rewrite" and "tied" in str(statuses["b"][1])
    assert "FFN at a" in str(statuses["b"][1])
    converted, report = _upcycled(model)
    assert [(s.path, s.status) for s in report.sites] == [("a", "converted"), ("b", "cannot rewrite")]
    assert "shares weights with b" in report.sites[0].notes[0]
    _assert_same_function(model, converted)


# 6. Modules the tracer cannot read -------------------------------------------------------------------------


class ScriptedNormLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.jit.script(nn.LayerNorm(D))
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def test_a_scripted_submodule_is_an_opaque_leaf() -> None:
    torch.manual_seed(0)
    model = ScriptedNormLayer()
    assert helper_methods(model.norm) == []
    report = mc.inspect(model)
    assert "TorchScript" in report.untraced["norm"]
    assert [(s.path, s.status) for s in report.sites] == [("mlp", "planned")]
    converted, _ = _upcycled(model)
    _assert_same_function(model, converted)


def test_an_uninitialised_lazy_module_is_a_config_error_naming_it() -> None:
    model = nn.Sequential(nn.LayerNorm(D), nn.Sequential(nn.LazyLinear(H), nn.GELU(), nn.Linear(H, D)))
    with pytest.raises(mc.ConfigError, match=r"1\.0 \(LazyLinear\).*run one forward"):
        mc.inspect(model)
    with pytest.raises(mc.ConfigError, match=r"1\.0 \(LazyLinear\)"):
        mc.convert(model, **MOE)
    model(torch.randn(2, D))  # initialised: an ordinary model
    assert [s.status for s in mc.inspect(model).sites] == ["planned"]
