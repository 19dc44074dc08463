"""The hooks a mixcompile plugin implements.

Each hook receives a ``register(name, factory, *, description="")`` callback, so one plugin can add many
named things. The built-ins in ``mixcompile_plugins`` use exactly these hooks; a third-party package
names the object implementing them under the ``mixcompile`` entry-point group: a module whose functions
are the hooks, or an instance of a class whose methods are (``module:attribute``)::

    [project.entry-points.mixcompile]
    cosine = "my_package.plugin:PLUGIN"  # PLUGIN = MyPlugin(), the hooks being MyPlugin's methods
    # or cosine = "my_package.plugin"    # the hooks being the module's functions

The entry point's name is the plugin's name (unique among installed distributions, and not a built-in's).
mixcompile registers what it names: that module must not call ``register_plugin`` at import.

What each ``factory`` must return:

- router: ``factory(d_model, num_experts, top_k, **options) -> mixcompile.Router`` (an ``nn.Module``
  returning a :class:`~mixcompile.RoutingPlan`; ``weights_sum_to_one`` True, where it holds, lets ``convert``
  check upcycled blocks against their dense FFN).
- mixer: ``factory(d_model, num_experts, group_size, **options) -> mixcompile.Mixer`` (an ``nn.Module``
  returning a :class:`~mixcompile.MixPlan`).
- kernel: ``factory() -> mixcompile.Kernel``.
- initializer: ``factory(experts, dense, *, generator, **options) -> None``: fills a
  :class:`~mixcompile.StackedExperts` in place, from a :class:`~mixcompile.DenseFFN` or ``None``.
- pattern: ``factory() -> mixcompile.compiler.Pattern`` (an FFN shape the compiler can find).
- builder: ``factory(**kwargs) -> nn.Module``: builds a base model from JSON scalars, so a saved model
  can name it in its manifest and be loaded without trusting code. It must validate its arguments
  (types and sizes: a manifest is untrusted input) and raise ``ConfigError`` for bad ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import pluggy
from torch import Generator, nn

if TYPE_CHECKING:
    from mixcompile.compiler.pattern import Pattern
    from mixcompile.runtime.experts import StackedExperts
    from mixcompile.runtime.ffn import DenseFFN
    from mixcompile.runtime.kernels import Kernel
    from mixcompile.runtime.mixing import Mixer
    from mixcompile.runtime.routing import Router

PROJECT = "mixcompile"
ENTRY_POINT_GROUP = "mixcompile"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# What a registration hook is handed, ``register(name, factory, *, description="")``, typed for its kind,
# so that a type checker sees a factory of the wrong shape (``def register_routers(register:
# mc.RouterRegister)``).
class RouterRegister(Protocol):
    def __call__(
        self, name: str, factory: Callable[[int, int, int], Router], *, description: str = ""
    ) -> None: ...


class MixerRegister(Protocol):
    def __call__(
        self, name: str, factory: Callable[[int, int, int], Mixer], *, description: str = ""
    ) -> None: ...


class KernelRegister(Protocol):
    def __call__(self, name: str, factory: Callable[[], Kernel], *, description: str = "") -> None: ...


class Initializer(Protocol):
    """``factory(experts, dense, *, generator, **options)``: fills ``experts`` in place."""

    def __call__(
        self, experts: StackedExperts, dense: DenseFFN | None, /, *, generator: Generator | None
    ) -> None: ...


class InitializerRegister(Protocol):
    def __call__(self, name: str, factory: Initializer, *, description: str = "") -> None: ...


class PatternRegister(Protocol):
    def __call__(self, name: str, factory: Callable[[], Pattern], *, description: str = "") -> None: ...


class BuilderRegister(Protocol):
    def __call__(self, name: str, factory: Callable[..., nn.Module], *, description: str = "") -> None: ...


@hookspec
def register_routers(register: RouterRegister) -> None:
    """Register MoE routers: ``register("topk", TopKRouter, description=...)``."""


@hookspec
def register_mixers(register: MixerRegister) -> None:
    """Register MoT mixers (the controller that weighs a group's tokens per expert)."""


@hookspec
def register_kernels(register: KernelRegister) -> None:
    """Register kernels that run the experts of MoE / MoT blocks."""


@hookspec
def register_initializers(register: InitializerRegister) -> None:
    """Register ways to fill expert weights (from a dense FFN, or from scratch)."""


@hookspec
def register_patterns(register: PatternRegister) -> None:
    """Register FFN shapes the compiler looks for in traced graphs."""


@hookspec
def register_builders(register: BuilderRegister) -> None:
    """Register base-model builders that a saved manifest may name (``{"kind": "builder", ...}``)."""
