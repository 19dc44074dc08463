"""Name the activation a graph node or module computes, in the terms of
:data:`mixcompile.runtime.activations.ACTIVATIONS`.

Models spell activations as modules (``nn.GELU``, HF ``NewGELUActivation``), as ``F.*`` / ``torch.*``
functions, as tensor methods, or as attributes holding a function (``nn.TransformerEncoderLayer.activation``,
which the tracer sees as a plain function call). Modules we do not know by class are probed: an elementwise,
parameter-free module that agrees with a known function on a float64 probe is that function. A class is
only trusted when it keeps its base's ``forward`` (an ``nn.ReLU`` subclass with its own forward is probed),
and the probe reaches magnitudes of 1e3, so a clipped or capped variant (``x.clamp(0, 20)``, HF's
``gelu_10``) that agrees on small inputs is not taken for the function it clips.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixcompile.compiler.linears import keeps_forward
from mixcompile.runtime.activations import ACTIVATIONS

_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
}
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_PROBE_TOLERANCE = 1e-6  # absolute, at float64: formulations of one function differ by ~1e-12 at 1e3
_PROBE_RTOL = 1e-10  # relative, for outputs that grow like x**2 (squared ReLU)
_CLASSES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.SiLU, "silu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
)
_probe_cache: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def module_activation(module: nn.Module) -> str | None:
    """The normalised name of an activation module, or ``None`` when it is not one we know."""
    if keeps_forward(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, name in _CLASSES:
        if keeps_forward(module, cls):
            return name
    if type(module).__module__.startswith("torch.") or not _probeable(module):
        return None
    return _probe(module)


def function_activation(function: object, kwargs: dict[str, Any]) -> str | None:
    """The normalised name of an activation function call (``F.gelu(x, approximate="tanh")`` included)."""
    try:
        name: str | None = _FUNCTIONS.get(function)  # type: ignore[call-overload]
    except TypeError:  # unhashable callables are never activations we know
        return None
    if name == "gelu" and kwargs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    return name


def node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation a single FX node applies to its first argument, or ``None``."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module_activation(module) if module is not None else None
    if node.op == "call_function" and len(node.args) == 1:
        return function_activation(node.target, dict(node.kwargs))
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _METHODS.get(str(node.target))
    return None


def _probeable(module: nn.Module) -> bool:
    """Only stateless leaf modules are probed: running anything else could have effects or cost."""
    return (
        not list(module.children())
        and not list(module.parameters(recurse=False))
        and not list(module.buffers(recurse=False))
    )


def _probe(module: nn.Module) -> str | None:
    if module not in _probe_cache:
        _probe_cache[module] = _probe_uncached(module)
    return _probe_cache[module]


def _probe_input() -> torch.Tensor:
    """Dense on [-6, 6] where activations differ, random values, and a log-spaced sweep out to +-1e3
    where a clipped or capped variant parts from the function it copies near 0."""
    near = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    rand = torch.randn(97, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    far = torch.logspace(0.0, 3.0, 48, dtype=torch.float64)  # 1 .. 1e3: every known one is saturated
    far = torch.cat([far, -far, torch.zeros(1, dtype=torch.float64)])
    return torch.stack([near, rand, far])


def _probe_uncached(module: nn.Module) -> str | None:
    x = _probe_input()
    try:
        with torch.no_grad():
            y = module(x)
            permuted = module(x.flip(-1))
    except Exception:  # noqa: BLE001 - a module that cannot take a tensor is not an activation
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not torch.equal(permuted.flip(-1), y):
        return None
    for name, function in ACTIVATIONS.items():
        if name != "identity" and torch.allclose(y, function(x), rtol=_PROBE_RTOL, atol=_PROBE_TOLERANCE):
            return name
    return None
