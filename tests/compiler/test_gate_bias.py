"""A gated FFN whose only bias is the gate projection's (``gate`` with a bias, ``up`` and ``down`` without):
the bias counts as one, so the block gets biases and the initializers keep it."""

import torch
import torch.nn.functional as F
from torch import nn

import mixcompile as mc


class GateBiasOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 16, bias=True)
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = GateBiasOnly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _model() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.mlp.gate.bias.uniform_(1.0, 2.0)  # large enough that dropping it shows
    return model.eval()


def test_a_gate_bias_alone_is_a_bias():
    h, d = 16, 8
    dense = mc.DenseFFN(
        w_in=torch.randn(h, d),
        w_out=torch.randn(d, h),
        activation="silu",
        w_gate=torch.randn(h, d),
        b_gate=torch.randn(h),
    )
    assert dense.has_bias


def test_upcycle_keeps_a_gate_only_bias():
    model = _model()
    moe = mc.convert(model, strategy="moe", num_experts=4, top_k=2, init="upcycle").eval()
    assert moe.mlp.experts.b_gate is not None
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)


def test_split_keeps_a_gate_only_bias():
    model = _model()
    # A zero router with top_k = E gives each expert weight 1/E; scale=E makes the experts' sum the dense FFN.
    moe = mc.convert(
        model,
        strategy="moe",
        num_experts=4,
        top_k=4,
        init="split",
        init_options={"scale": 4},
        router_options={"init_std": 0.0},
    ).eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)
