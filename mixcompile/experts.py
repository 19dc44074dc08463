"""Expert weights stacked as ``[E, ...]`` tensors.

Stacking (instead of a ``ModuleList`` of ``nn.Linear``) lets one kernel launch serve every expert and keeps
the parameters plain tensors for FSDP and ``state_dict``. Shapes follow ``nn.Linear``:
``w_in [E, h, d]``, ``w_gate [E, h, d]``, ``w_out [E, d, h]``, ``b_in [E, h]``, ``b_gate [E, h]``,
``b_out [E, d]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import activation_fn
from .errors import check_positive_int


class StackedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        activation_fn(activation)
        self.activation = activation
        self.gated = bool(gated)
        self.bias = bool(bias)
        factory = {"device": device, "dtype": dtype}
        e, d, h = num_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(e, h, d, **factory))
        self.w_gate = nn.Parameter(torch.empty(e, h, d, **factory)) if gated else None
        self.w_out = nn.Parameter(torch.empty(e, d, h, **factory))
        self.b_in = nn.Parameter(torch.empty(e, h, **factory)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(e, h, **factory)) if bias and gated else None
        self.b_out = nn.Parameter(torch.empty(e, d, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, per expert."""
        for name, fan_in in (("w_in", self.d_model), ("w_gate", self.d_model), ("w_out", self.d_hidden)):
            self._uniform(name, fan_in)
        for name, fan_in in (("b_in", self.d_model), ("b_gate", self.d_model), ("b_out", self.d_hidden)):
            self._uniform(name, fan_in)

    def _uniform(self, name: str, fan_in: int) -> None:
        param = getattr(self, name)
        if param is not None:
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                param.uniform_(-bound, bound)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x [n, d]``: the plain-PyTorch definition every kernel must match."""
        act = activation_fn(self.activation)
        up = x @ self.w_in[e].t()
        if self.b_in is not None:
            up = up + self.b_in[e]
        if self.w_gate is not None:
            gate = x @ self.w_gate[e].t()
            if self.b_gate is not None:
                gate = gate + self.b_gate[e]
            hidden = act(gate) * up
        else:
            hidden = act(up)
        out = hidden @ self.w_out[e].t()
        if self.b_out is not None:
            out = out + self.b_out[e]
        return out

    def batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows at once: ``x [E, n, d] -> [E, n, d]``."""
        act = activation_fn(self.activation)
        up = torch.bmm(x, self.w_in.transpose(1, 2))
        if self.b_in is not None:
            up = up + self.b_in.unsqueeze(1)
        if self.w_gate is not None:
            gate = torch.bmm(x, self.w_gate.transpose(1, 2))
            if self.b_gate is not None:
                gate = gate + self.b_gate.unsqueeze(1)
            hidden = act(gate) * up
        else:
            hidden = act(up)
        out = torch.bmm(hidden, self.w_out.transpose(1, 2))
        if self.b_out is not None:
            out = out + self.b_out.unsqueeze(1)
        return out

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"{kind}, activation={self.activation!r}, bias={self.bias}"
        )
