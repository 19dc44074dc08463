"""Recognise linear-like modules and read their weights in ``nn.Linear`` layout.

Models hold projections as ``nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``) or as Hugging
Face's GPT-2 style ``Conv1D``, whose weight is stored transposed (``[in, out]``). Patterns and initializers
want one layout, ``weight [out, in]``, so this is the only place that knows the difference.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D``: a linear layer with ``weight [nx, nf]``, ``bias [nf]`` (matched by name and shape)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias [out] or None)`` of a linear-like module: detached views of its params."""
    # Tensors in a linear-like module (nn.Module's __getattr__ is typed Tensor | Module).
    weight = cast(torch.Tensor, module.weight).detach()
    bias = cast(torch.Tensor, module.bias).detach() if getattr(module, "bias", None) is not None else None
    if _is_conv1d(module):
        weight = weight.t()
    return weight, bias
