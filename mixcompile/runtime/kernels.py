"""The kernel interface and kernel selection.

A kernel runs the experts of a block given the plan its router / mixer made. Kernels declare what they
support, so ``kernel="auto"`` can pick the best one for the device and dtype; the choice is visible through
:meth:`MoEBlock.kernel_for` and in ``inspect`` reports. Blocks resolve their kernel when they are built or
moved (:meth:`Block._apply`), never inside a forward, so ``torch.compile`` traces no registry look-up.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from mixcompile.errors import ConfigError, PluginError
from mixcompile.plugins.build import build_plugin, call_plugin_method, describe_plugin
from mixcompile.plugins.manager import ENV_VAR, lookup, registry
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.mixing import MixPlan
from mixcompile.runtime.routing import RoutingPlan, topk_routing
from mixcompile.types import BlockKind


@runtime_checkable
class Kernel(Protocol):
    """Runs what a block does on its device: the experts, and the routing step of the routers that use it.

    ``priority`` orders kernels for ``kernel="auto"`` (higher wins among those that support the input).
    A kernel is one object per process, so it holds no per-block state. Implement the protocol
    structurally, or subclass it to inherit the defaults (priority 0, the plain-PyTorch routing step).

    Optional: a class attribute ``hidden_dropout = True`` says that ``moe`` / ``mot`` apply
    ``experts.hidden_dropout`` to the hidden activations in training (``experts.activate`` does it). A
    block with hidden dropout resolves ``auto`` to such a kernel for training and refuses a named one that
    lacks it. Optional too: a method ``auto_priority(kind, device, dtype) -> int`` ranks the kernel for
    ``auto`` on one input instead of ``priority`` (a kernel measured slower than another there steps back,
    and still runs when named). (Neither is a protocol member, so kernels written before them still satisfy
    the protocol.)
    """

    priority: int = 0

    def supports(self, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this kernel can run a ``kind`` block on this device and dtype."""
        ...

    def moe(self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts) -> torch.Tensor:
        """``x [N, d]`` → ``[N, d]``: ``y[t] = sum over pairs (t, e, w) of w * expert_e(x[t])``."""
        raise NotImplementedError(f"{type(self).__name__} does not run MoE blocks.")

    def mot(self, x_g: torch.Tensor, plan: MixPlan, experts: StackedExperts) -> torch.Tensor:
        """``x_g [T, n, G, d]`` → same shape: merge per expert, run experts, emit back."""
        raise NotImplementedError(f"{type(self).__name__} does not run MoT blocks.")

    def topk_routing(
        self, logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None = None, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`mixcompile.topk_routing` on this kernel's device; a class that subclasses ``Kernel``
        inherits the plain-PyTorch step."""
        return topk_routing(logits, top_k, bias=bias, renormalize=renormalize)


_instances: dict[str, Kernel] = {}


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name`` (one instance per process)."""
    registration = lookup("kernel", name)
    kernel = _instances.get(name)
    if kernel is None or type(kernel) is not registration.factory:
        kernel = build_plugin("kernel", name, expected=Kernel)
        _instances[name] = kernel
    return kernel


def resolve_kernel(
    name: str, kind: BlockKind, device: torch.device, dtype: torch.dtype, *, hidden_dropout: float = 0.0
) -> tuple[str, Kernel]:
    """Pick the kernel for a block: by name (checked to support the input), or the best for ``auto``.

    ``hidden_dropout`` > 0 asks for a kernel that applies the experts' hidden dropout (a training forward of
    a block that has one)."""
    if name != "auto":
        kernel = get_kernel(name)
        if not _supports(name, kernel, kind, device, dtype):
            raise ConfigError(
                f"kernel {name!r} does not support {kind} blocks on {device.type} with {dtype}; "
                "use kernel='auto' to pick a kernel that does."
            )
        if hidden_dropout > 0 and not getattr(kernel, "hidden_dropout", False):
            raise ConfigError(
                f"kernel {name!r} does not apply hidden dropout (p={hidden_dropout}) in training; use "
                "kernel='auto' (it picks one that does for training), or build the block with "
                "hidden_dropout=0."
            )
        return name, kernel
    candidates = []
    for reg_name in registry().names("kernel"):
        try:
            kernel = get_kernel(reg_name)
            dropout_ok = hidden_dropout == 0 or getattr(kernel, "hidden_dropout", False)
            if dropout_ok and _supports(reg_name, kernel, kind, device, dtype):
                candidates.append((-_priority(reg_name, kernel, kind, device, dtype), reg_name, kernel))
        except PluginError as exc:
            # No skipping a broken kernel: which kernel auto picks would then depend on a plugin's bug.
            raise PluginError(
                f"kernel='auto' for {kind} blocks on {device.type} with {dtype} asks every registered "
                f"kernel, and {exc} Until it is fixed, leave that plugin out ({ENV_VAR} for an installed "
                "one, mixcompile.unregister_plugin for one registered in this process)."
            ) from exc
    if not candidates:
        needs = f" that applies hidden dropout (p={hidden_dropout})" if hidden_dropout > 0 else ""
        raise ConfigError(
            f"no registered kernel{needs} supports {kind} blocks on {device.type} with {dtype}."
        )
    _, chosen, kernel = min(candidates, key=lambda c: (c[0], c[1]))
    return chosen, kernel


def _supports(name: str, kernel: Kernel, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> bool:
    """``kernel.supports(...)``, a crash or a non-bool answer naming the kernel and its plugin."""
    source = describe_plugin("kernel", name)
    answer = call_plugin_method(source, "in supports()", kernel.supports, kind, device, dtype)
    if isinstance(answer, bool):
        return answer
    numpy_bool = type(answer).__module__ == "numpy" and type(answer).__name__ in ("bool", "bool_")
    tensor_bool = isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1
    if numpy_bool or tensor_bool:
        return bool(answer)
    kind_of = f"{type(answer).__module__}.{type(answer).__qualname__}".removeprefix("builtins.")
    raise PluginError(f"{source} returned {kind_of} {answer!r} from supports(), expected True or False.")


def _priority(name: str, kernel: Kernel, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> float:
    """The kernel's rank for ``auto``: ``auto_priority(kind, device, dtype)`` if it has one, else
    ``priority``; a crash or a value that is not a number names the kernel and its plugin."""
    source = describe_plugin("kernel", name)
    rank = call_plugin_method(source, "reading auto_priority", getattr, kernel, "auto_priority", None)
    if rank is None:
        what = "priority"
        value = call_plugin_method(source, "reading priority", getattr, kernel, "priority", 0)
    else:
        what = "auto_priority()"
        value = call_plugin_method(source, "in auto_priority()", rank, kind, device, dtype)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise PluginError(f"{source} has {what} {value!r}, expected a number (higher wins in kernel='auto').")
    return value
