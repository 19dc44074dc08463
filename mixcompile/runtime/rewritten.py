"""What a rewrite leaves in a converted model besides its blocks, so a model runs (and unpickles) with the
runtime alone: the forward of a module whose inline FFN became a block, and the hook that lets a block take
its input by the keyword the FFN module's forward named it."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

from torch import fx, nn


class EditedForward:
    """The ``forward`` of a module whose inline FFN became a block: the edited graph's code, run on the
    module itself (attributes are looked up at each call, so weights loaded or moved later are the ones
    used). Pickled and copied as its graph; the code is generated when it is made, so ``torch.compile``
    finds plain Python to trace.

    It is bound to the module it was made for: a shallow copy of that module (``copy.copy``,
    ``nn.DataParallel``'s replicas) would run on the original's submodules; ``copy.deepcopy`` and pickling
    bind the copy to its own."""

    def __init__(self, owner: nn.Module, graph: fx.Graph) -> None:
        self.owner, self.graph = owner, graph
        parameters = list(inspect.signature(type(owner).forward).parameters.values())
        self.__signature__ = inspect.Signature(parameters[1:])
        code = graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<{type(owner).__name__}.forward, edited>", "exec"), namespace)  # noqa: S102
        self._code: Callable[..., object] = namespace["forward"]

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._code(self.owner, *args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple[nn.Module, fx.Graph]]:
        return EditedForward, (self.owner, self.graph)


def edited_graph(module: nn.Module) -> fx.Graph | None:
    """The graph ``module`` runs as its forward if a graph edit gave it one (a copy), else ``None``."""
    forward = vars(module).get("forward")
    return copy.deepcopy(forward.graph) if isinstance(forward, EditedForward) else None


class KeywordInput:
    """A forward pre-hook that passes a block's input given as keyword ``name`` positionally."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[tuple[object, ...], dict[str, object]] | None:
        if args or self.name not in kwargs:
            return None
        kwargs = dict(kwargs)
        return (kwargs.pop(self.name),), kwargs


def carry_keyword_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a block replacing ``old``) the keyword hooks ``old`` had."""
    for hook in old._forward_pre_hooks.values():
        if isinstance(hook, KeywordInput):
            new.register_forward_pre_hook(hook, with_kwargs=True)
