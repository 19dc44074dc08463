"""Sparse blocks under ``torch.autocast``: like the dense FFN's linears they compute in, and return, the
autocast dtype, with float32 gradients for float32 parameters; results stay within bfloat16 rounding of a
float64 run of the same block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err

import mixcompile as mc
from mixcompile import build_tiny_gpt

BF16_TOL = 3e-2


def blocks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "moe": mc.MoEBlock(16, 40, 4, top_k=2, gated=True, bias=True, num_shared_experts=1, kernel="torch"),
        "mot": mc.MoTBlock(16, 40, 4, group_size=2, mixer_options={"init_std": 0.5}, kernel="torch"),
    }


@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_block_computes_in_the_autocast_dtype(kind: str) -> None:
    block = blocks()[kind]
    exact = copy.deepcopy(block).double()
    x = torch.randn(5, 7, 16)
    upstream = torch.randn(5, 7, 16)

    x_mixed = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x_mixed)
    (y.float() * upstream).sum().backward()

    x_exact = x.double().requires_grad_()
    y_exact = exact(x_exact)
    (y_exact * upstream.double()).sum().backward()

    assert y.dtype == torch.bfloat16
    assert x_mixed.grad.dtype == torch.float32 and block.experts.w_in.grad.dtype == torch.float32
    assert rel_err(y, y_exact) < BF16_TOL
    assert rel_err(x_mixed.grad, x_exact.grad) < BF16_TOL
    assert rel_err(block.experts.w_in.grad, exact.experts.w_in.grad) < BF16_TOL


def test_converted_model_trains_under_autocast() -> None:
    torch.manual_seed(0)
    base = build_tiny_gpt(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq=16)
    model = mc.convert(base, strategy="moe", num_experts=4, top_k=2, sites=[0])
    model = mc.convert(model, strategy="mot", num_experts=4, group_size=2, init="random")
    tokens = torch.randint(0, 256, (4, 13))

    def loss_of(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    reference = loss_of(autocast=False).item()
    loss = loss_of(autocast=True)
    loss.backward()
    assert abs(loss.item() - reference) / reference < 1e-2
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
