"""Removing the forward hooks mixcompile installed on a module, the one place that reaches into torch's
hook dictionaries: a converted model is hooked again on every conversion, and handles would not survive a
deep copy or a pickle, so the hooks are found by what they are and dropped by key, with their flags."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def remove_forward_hooks(module: nn.Module, ours: Callable[[object], bool]) -> None:
    """Drop ``module``'s forward pre-hooks and forward hooks for which ``ours(hook)`` holds."""
    for key in [k for k, hook in module._forward_pre_hooks.items() if ours(hook)]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in [k for k, hook in module._forward_hooks.items() if ours(hook)]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
