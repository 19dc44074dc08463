"""The canonical view of a dense feed-forward network.

Whatever shape an FFN has in a model (``nn.Linear`` pairs, HF ``Conv1D`` with a transposed weight, a fused
gate-up projection), the compiler hands initializers this one view, so an initializer is written once.

Plain:  ``y = w_out · act(w_in · x + b_in) + b_out``
Gated:  ``y = w_out · (act(w_gate · x + b_gate) * (w_in · x + b_in)) + b_out``  (LLaMA: gate=gate_proj,
in=up_proj, out=down_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixcompile.errors import ShapeError
from mixcompile.runtime.activations import activation_fn
from mixcompile.runtime.experts import ExpertTensors
from mixcompile.types import Activation


@dataclass
class DenseFFN:
    """A dense FFN's tensors, as ``nn.Linear`` stores them (the formulas above): what initializers fill
    experts from."""

    w_in: torch.Tensor  # [h, d]
    w_out: torch.Tensor  # [d, h]
    activation: Activation
    w_gate: torch.Tensor | None = None  # [h, d]
    b_in: torch.Tensor | None = None  # [h]
    b_gate: torch.Tensor | None = None  # [h]
    b_out: torch.Tensor | None = None  # [d]

    def __post_init__(self) -> None:
        activation_fn(self.activation)  # unknown names fail here, not at the first forward
        h, d = self.w_in.shape
        expected = {
            "w_out": (self.w_out, (d, h)),
            "w_gate": (self.w_gate, (h, d)),
            "b_in": (self.b_in, (h,)),
            "b_gate": (self.b_gate, (h,)),
            "b_out": (self.b_out, (d,)),
        }
        for name, (tensor, shape) in expected.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ShapeError(
                    f"DenseFFN.{name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"(from w_in of shape {(h, d)} = [hidden, model])."
                )
        if self.b_gate is not None and self.w_gate is None:
            raise ShapeError("DenseFFN.b_gate given without w_gate.")

    @property
    def d_model(self) -> int:
        return self.w_in.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.w_in.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def has_bias(self) -> bool:
        return self.b_in is not None or self.b_gate is not None or self.b_out is not None

    @property
    def tensors(self) -> ExpertTensors:
        """Its tensors in the order of :attr:`StackedExperts.tensors`, so that the two pair up by ``zip``
        (each expert tensor is ``[E, *shape]`` of the one here)."""
        return ExpertTensors(self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense function itself: the reference an upcycled block must reproduce."""
        act = activation_fn(self.activation)
        up = torch.nn.functional.linear(x, self.w_in, self.b_in)
        if self.w_gate is not None:
            hidden = act(torch.nn.functional.linear(x, self.w_gate, self.b_gate)) * up
        else:
            hidden = act(up)
        return torch.nn.functional.linear(hidden, self.w_out, self.b_out)
