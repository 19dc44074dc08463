"""Mixing plans and the base class of MoT mixers (the controller).

A group is G tokens at the same position in G different sequences. For each expert, the mixer gives
weights over the group members (``merge``) that build the one token that expert processes, and the weights
(``emit``) with which the expert's output is spread back to the members. Only same-position tokens are
mixed, so a causal model stays causal.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mixcompile.errors import check_positive_int
from mixcompile.runtime.routing import gate_layer

#: The lowest softmax temperature of a mixer (the checks of ``set_mot_temperature``, ``temperature_schedule``
#: and the built-in mixer): below it the scaled scores overflow to inf and the mix is NaN (``mode="sparse"``
#: is the limit towards 0). A saved setting loads any temperature > 0: a third party's mixer may take less.
MIN_TEMPERATURE = 1e-6


def read_only_temperature(mixer: object) -> bool:
    """Whether ``mixer`` computes its temperature itself (a property without a setter): there is nothing
    for :func:`~mixcompile.set_mot_temperature` or a load to set."""
    declared = getattr(type(mixer), "temperature", None)
    return isinstance(declared, property) and declared.fset is None


def settable_temperature(mixer: object) -> bool:
    """Whether ``mixer`` has a float ``temperature`` that can be set."""
    return not read_only_temperature(mixer) and isinstance(getattr(mixer, "temperature", None), float)


@dataclass
class MixPlan:
    """What a mixer returns for one MoT forward: per expert, how each group's members are merged into its
    input and how its output is spread back to them."""

    merge: torch.Tensor  # [T, n, G, E]: for each expert, weights over the G members (0 for missing members)
    emit: torch.Tensor  # [T, n, G, E]: weight of expert e's output in member g's result


@runtime_checkable
class Mixer(Protocol):
    """What a MoT block needs of a mixer plugin (which must also be an ``nn.Module``):
    ``mixer(x_g [T, n, G, d], present [T, n, G] bool, *, sparse: bool) -> MixPlan``.

    ``present`` (``[1, n, G]`` when nothing is padded; it broadcasts over positions) is False for the
    missing members of an incomplete last group and for padding tokens; they must get weight 0 in ``merge``
    and ``emit`` and must not take part in any normalisation. A position may have no member present.
    ``sparse=True`` asks for the transition mode in which each expert keeps only its top-weighted member.
    """

    num_experts: int
    group_size: int

    def __call__(self, x_g: torch.Tensor, present: torch.Tensor, *, sparse: bool) -> MixPlan: ...


class ControllerMixer(nn.Module):
    """Base of mixers with a learned controller ``W_c [d, E]`` scoring every token for every expert;
    subclasses implement the :class:`Mixer` call as ``forward``."""

    def __init__(self, d_model: int, num_experts: int, group_size: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.group_size = check_positive_int(
            "group_size", group_size, hint="A group is G tokens at one position from G sequences; use G >= 1."
        )
        self.controller = gate_layer(d_model, num_experts, init_std)

    def logits(self, x_g: torch.Tensor) -> torch.Tensor:
        """In float32 or wider: a softmax over bf16 scores loses the weights' small differences, and a
        float64 block (gradcheck, a reference run) keeps float64. A plain ``nn.Linear`` controller's product
        is computed in that precision (input and weights upcast, autocast off; gradients flow back in their
        own dtypes): upcasting a bf16 product would keep its rounding, which large scores turn into visibly
        wrong weights. Any other controller (a subclass, a wrapped or hooked layer such as a LoRA adapter)
        runs its own forward, and its scores are upcast."""
        controller = self.controller
        hooked = controller._forward_hooks or controller._forward_pre_hooks
        if type(controller) is not nn.Linear or hooked:
            scores: torch.Tensor = controller(x_g)
            return scores.to(torch.promote_types(scores.dtype, torch.float32))
        weight = controller.weight
        dtype = torch.promote_types(torch.promote_types(x_g.dtype, weight.dtype), torch.float32)
        bias = None if controller.bias is None else controller.bias.to(dtype)
        # A block's x_g is a permuted view of its batch: the product runs over the rows in memory order
        # (else the upcast input would be copied once more, into row order) and only the small [.., E]
        # scores are put back in order.
        order = _memory_order(x_g)
        x = x_g if order is None else x_g.permute(order)
        device = x_g.device.type
        # the meta device (shape inference) has no autocast to turn off: torch.autocast("meta") raises
        # (not asked with torch.amp.is_autocast_available, which torch 2.11's Dynamo cannot trace)
        autocast = device != "meta"
        with torch.autocast(device, enabled=False) if autocast else nullcontext():
            scores = nn.functional.linear(x.to(dtype), weight.to(dtype), bias)
        if order is None:
            return scores
        return scores.permute(sorted(range(len(order)), key=order.__getitem__)).contiguous()


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """The order of ``x``'s dimensions (the last one kept last) in which it is contiguous, where that is
    not the order it has; None otherwise."""
    if x.is_contiguous() or torch.compiler.is_compiling():  # compiled, the layout is the compiler's choice
        return None
    strides = x.stride()
    order = [*sorted(range(x.ndim - 1), key=lambda dim: -strides[dim]), x.ndim - 1]
    return order if x.permute(order).is_contiguous() else None
