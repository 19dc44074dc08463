"""One vocabulary for the activations found in FFNs.

Models spell the same function many ways (``nn.GELU(approximate="tanh")``, HF ``NewGELUActivation``,
``F.gelu``, ``torch.nn.functional.silu``, a ``.relu()`` method). Blocks and kernels only ever see the
normalised names of :data:`mixcompile.types.Activation`, so one kernel epilogue serves all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixcompile.errors import UnknownNameError


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


#: The function of each :data:`~mixcompile.types.Activation` (a test holds the two to the same names).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "squared_relu": _squared_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for a normalised activation name; unknown names list the known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("activation", str(name), ACTIVATIONS) from None
