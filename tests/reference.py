"""Independent plain-PyTorch references, written per token with explicit loops, in float64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {
    "relu": F.relu,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


def f64(t):
    return None if t is None else t.detach().double()


def dense_ffn(x, w_in, w_out, act, w_gate=None, b_in=None, b_gate=None, b_out=None):
    """The dense FFN, float64, from raw weight tensors."""
    x = x.double()
    up = x @ f64(w_in).t() + (0 if b_in is None else f64(b_in))
    if w_gate is not None:
        hidden = ACT[act](x @ f64(w_gate).t() + (0 if b_gate is None else f64(b_gate))) * up
    else:
        hidden = ACT[act](up)
    return hidden @ f64(w_out).t() + (0 if b_out is None else f64(b_out))


def expert(experts, e, x):
    """Expert ``e`` of a StackedExperts on rows ``x``, float64."""
    pick = lambda t: None if t is None else t[e]  # noqa: E731
    return dense_ffn(
        x,
        experts.w_in[e],
        experts.w_out[e],
        experts.activation,
        pick(experts.w_gate),
        pick(experts.b_in),
        pick(experts.b_gate),
        pick(experts.b_out),
    )


def moe_from_plan(x, plan, experts):
    """``y[t] = sum over kept (t, e, w) of w * expert_e(x[t])``, one pair at a time."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    pairs = zip(plan.token_index.tolist(), plan.expert_index.tolist(), plan.weight.tolist(), strict=True)
    for t, e, w in pairs:
        y[t] += w * expert(experts, e, x[t : t + 1])[0]
    return y


def mot(x, controller_weight, experts, group_size, temperature=1.0, emit="merge"):
    """Mixture of Tokens by the paper's definition, looping over groups, positions and experts.

    ``x [B, T, d]``; group j holds sequences j*G .. j*G+G-1 (fewer for the last one).
    """
    x = x.double()
    b, t_len, _ = x.shape
    e_count = experts.num_experts
    wc = f64(controller_weight)  # [E, d]
    y = torch.zeros_like(x)
    for start in range(0, b, group_size):
        members = list(range(start, min(b, start + group_size)))
        for t in range(t_len):
            tokens = x[members, t]  # [g, d]
            scores = tokens @ wc.t()  # [g, E]
            merge = torch.softmax(scores / temperature, dim=0)  # the temperature is the group softmax's
            emit_w = merge if emit == "merge" else torch.softmax(scores, dim=1)
            for e in range(e_count):
                mixed = (merge[:, e : e + 1] * tokens).sum(0, keepdim=True)
                out = expert(experts, e, mixed)[0]
                for i, s in enumerate(members):
                    y[s, t] += emit_w[i, e] * out
    return y


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
