"""Expert weights stacked as ``[E, ...]`` tensors.

Stacking (instead of a ``ModuleList`` of ``nn.Linear``) lets one kernel launch serve every expert and keeps
the parameters plain tensors for FSDP and ``state_dict``. Shapes follow ``nn.Linear``:
``w_in [E, h, d]``, ``w_gate [E, h, d]``, ``w_out [E, d, h]``, ``b_in [E, h]``, ``b_gate [E, h]``,
``b_out [E, d]``. ``hidden_dropout`` is the dense FFN's dropout between its two projections, applied to
every expert's hidden activations in training (as the dense model applied it to its own).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mixcompile.errors import ConfigError, check_bool, check_number, check_positive_int
from mixcompile.runtime.activations import activation_fn
from mixcompile.types import Activation

_deferred = False


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Experts built in the body get their weights on the meta device, uninitialised: the compiler builds
    a block, then allocates the experts where the model lives and lets an initializer fill them, instead
    of drawing random weights an upcycle would overwrite (most of a conversion's time, otherwise)."""
    global _deferred
    previous, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = previous


class ExpertTensors(NamedTuple):
    """The stacked tensors as one value (None for those a block does not have), for kernels to pass around;
    also a dense FFN's (:attr:`DenseFFN.tensors`), unstacked, in the same order."""

    w_in: torch.Tensor
    w_gate: torch.Tensor | None
    w_out: torch.Tensor
    b_in: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_out: torch.Tensor | None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExpertTensors:
        """``fn`` applied to each present tensor."""
        w_in, w_gate, w_out, b_in, b_gate, b_out = (None if t is None else fn(t) for t in self)
        assert w_in is not None and w_out is not None  # always present
        return ExpertTensors(w_in, w_gate, w_out, b_in, b_gate, b_out)


class ExpertMath:
    """The plain-PyTorch definition of stacked experts every kernel must match, for any object holding
    ``w_in``, ``w_gate``, ``w_out``, the three biases and ``activation`` (:class:`StackedExperts`, or a view
    of another model's expert tensors)."""

    w_in: torch.Tensor
    w_gate: torch.Tensor | None
    w_out: torch.Tensor
    b_in: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_out: torch.Tensor | None
    activation: Activation
    #: Dropout on the hidden activations in training (the dense FFN's dropout between its two linears).
    hidden_dropout: float = 0.0
    training: bool

    @property
    def tensors(self) -> ExpertTensors:
        """The stacked tensors as one value, as kernels take them."""
        return ExpertTensors(self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out)

    def batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows at once: ``x [E, n, d] -> [E, n, d]``."""
        b_in, b_gate, b_out = (
            None if b is None else b.unsqueeze(1) for b in (self.b_in, self.b_gate, self.b_out)
        )
        up = _plus_bias(x @ self.w_in.mT, b_in)
        gate = None if self.w_gate is None else _plus_bias(x @ self.w_gate.mT, b_gate)
        return _plus_bias(self.activate(up, gate) @ self.w_out.mT, b_out)

    def activate(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The hidden activations from the pre-activations: ``act(up)`` or ``act(gate) * up``, then the
        hidden dropout in training. Kernels that compute the projections themselves call this."""
        act = activation_fn(self.activation)
        hidden = act(up) if gate is None else act(gate) * up
        if self.hidden_dropout > 0 and self.training:
            hidden = F.dropout(hidden, self.hidden_dropout, training=True)
        return hidden


class StackedExperts(ExpertMath, nn.Module):
    """``E`` experts of one shape, stacked: ``w_in [E, h, d]``, ``w_out [E, d, h]`` (``w_gate`` like
    ``w_in`` when gated; biases ``[E, h]`` / ``[E, d]``), as grouped kernels read them."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: Activation = "gelu",
        gated: bool = False,
        bias: bool = False,
        hidden_dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_factory_kwargs(device, dtype)
        self.hidden_dropout = check_number("hidden_dropout", hidden_dropout, minimum=0, maximum=1)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        activation_fn(activation)
        self.activation = activation
        self.gated = check_bool("gated", gated)
        self.bias = check_bool("bias", bias)
        if _deferred:  # see deferred_init: allocated and filled later, where the model lives
            device = "meta"
        e, d, h = num_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(e, h, d, device=device, dtype=dtype))
        self.w_gate = nn.Parameter(torch.empty(e, h, d, device=device, dtype=dtype)) if gated else None
        self.w_out = nn.Parameter(torch.empty(e, d, h, device=device, dtype=dtype))
        self.b_in = nn.Parameter(torch.empty(e, h, device=device, dtype=dtype)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(e, h, device=device, dtype=dtype)) if bias and gated else None
        self.b_out = nn.Parameter(torch.empty(e, d, device=device, dtype=dtype)) if bias else None
        if not _deferred:
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``'s default init, per expert. With a (CPU) ``generator`` the values are drawn on the
        CPU and copied, so a seed gives the same experts on every device."""
        for name, fan_in in (("w_in", self.d_model), ("w_gate", self.d_model), ("w_out", self.d_hidden)):
            self._uniform(name, fan_in, generator)
        for name, fan_in in (("b_in", self.d_model), ("b_gate", self.d_model), ("b_out", self.d_hidden)):
            self._uniform(name, fan_in, generator)

    def _uniform(self, name: str, fan_in: int, generator: torch.Generator | None) -> None:
        param = getattr(self, name)
        if param is None:
            return
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            if generator is None:
                param.uniform_(-bound, bound)
            else:
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"{kind}, activation={self.activation!r}, bias={self.bias}"
            + (f", hidden_dropout={self.hidden_dropout}" if self.hidden_dropout else "")
        )


def _check_factory_kwargs(device: torch.device | str | None, dtype: torch.dtype | None) -> None:
    """``device`` and ``dtype`` as ``torch.empty`` takes them, refused naming the argument (torch's errors
    name neither)."""
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}."
            ) from exc
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(
            f"dtype must be a floating-point torch.dtype such as torch.float16 (experts are trained "
            f"weights), got {dtype!r}."
        )


def _plus_bias(t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``t + bias`` in ``t``'s dtype, as ``nn.Linear`` adds its bias under autocast (a float32 bias would
    otherwise promote an autocast product back to float32)."""
    return t if bias is None else t + bias.to(t.dtype)
