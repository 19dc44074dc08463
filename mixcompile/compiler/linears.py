"""Recognise linear-like modules and read their weights in ``nn.Linear`` layout.

Models hold projections as ``nn.Linear`` (and subclasses that keep its ``forward``, plus Falcon's
``FalconLinear``, whose own forward is the same product) or as Hugging Face's GPT-2 style ``Conv1D``,
whose weight is stored transposed (``[in, out]``). Patterns and initializers want one layout,
``weight [out, in]``, so this is the only place that knows the difference.

A subclass that overrides ``forward`` (LoRA, QAT, a scaled linear) computes more than ``x @ W.T + b``: it
is not linear-like, so the tracer looks inside it and no FFN pattern reads it as a bare projection.
"""

from __future__ import annotations

from typing import TypeGuard, TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

_M = TypeVar("_M", bound=nn.Module)


def keeps_forward(module: nn.Module, base: type[_M]) -> TypeGuard[_M]:
    """Whether ``module`` is a ``base`` whose class does not override ``base.forward``: only then does
    its class say what it computes."""
    return isinstance(module, base) and getattr(type(module), "forward", None) is base.forward


def _is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D``: a linear layer with ``weight [nx, nf]``, ``bias [nf]`` (matched by name and shape)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _is_falcon_linear(module: nn.Module) -> bool:
    """Transformers' ``FalconLinear``: its forward is ``input @ weight.T + bias``, unfused on purpose."""
    cls = type(module)
    return (
        isinstance(module, nn.Linear)
        and cls.__name__ == "FalconLinear"
        and cls.__module__.startswith("transformers.models.falcon.")
    )


def is_linear_like(module: nn.Module) -> bool:
    """A projection the compiler may read as ``x @ W.T + b`` from its weights alone."""
    return keeps_forward(module, nn.Linear) or _is_falcon_linear(module) or _is_conv1d(module)


def computed_weight_reason(module: nn.Module) -> str | None:
    """Why the module does not compute with its stored ``weight`` as it stands (a parametrization, a
    forward hook or pre-hook), or ``None``. Experts copied from ``.weight`` would compute something else."""
    if parametrize.is_parametrized(module):
        parametrized = cast(nn.ModuleDict, module.parametrizations)
        what = ", ".join(f"{name} ({_classes(plist)})" for name, plist in parametrized.items())
        return f"its {what} is computed by a torch.nn.utils.parametrize parametrization on every call"
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    if hooks:
        names = ", ".join(sorted({_hook_name(hook) for hook in hooks}))
        return f"it has forward hooks or pre-hooks ({names}) that may compute its weight or change its output"
    return None


def _classes(modules: nn.Module) -> str:
    return " then ".join(type(m).__name__ for m in modules.children())


def _hook_name(hook: object) -> str:
    name = getattr(hook, "__qualname__", None)
    return str(name) if name is not None else type(hook).__name__


def weight_identity(module: nn.Module) -> int:
    """A stable identity for the weight a linear-like module reads: a parametrized weight is a fresh
    tensor on every access, so its parametrization stands for it."""
    if parametrize.is_parametrized(module, "weight"):
        return id(cast(nn.ModuleDict, module.parametrizations)["weight"])
    return id(module.weight)


def linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias [out] or None)`` of a linear-like module: detached views of its params."""
    # Tensors in a linear-like module (nn.Module's __getattr__ is typed Tensor | Module).
    weight = cast(torch.Tensor, module.weight).detach()
    bias = cast(torch.Tensor, module.bias).detach() if getattr(module, "bias", None) is not None else None
    if _is_conv1d(module):
        weight = weight.t()
    return weight, bias
