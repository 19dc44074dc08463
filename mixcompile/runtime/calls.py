"""One forward of a converted model as one scope for what its blocks keep: router losses and statistics.

A block that the model's forward calls more than once (a layer shared across depth, as ALBERT's, or a loop
over one block) adds each call's router losses and statistics to the earlier calls' of that forward, so
:func:`mixcompile.aux_loss` balances the router on every call, as the losses are defined, and
:func:`mixcompile.stats` counts every token routed. A call outside the model's forward (a block, or a
submodule of the model, called on its own) replaces what the last call kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from mixcompile.runtime.hooks import remove_forward_hooks

if TYPE_CHECKING:
    from mixcompile.runtime.blocks.base import Block

# Per block kind: counts that add up, and (mean, weight) pairs averaged weighted by a count. Calls of one
# forward combine by these rules, and so do ranks (mixcompile.distributed.all_reduce_stats).
SUMMED = {"moe": ("tokens", "dropped_tokens", "dropped_assignments"), "mot": ("groups", "missing_members")}
AVERAGED = {"moe": ("routing_entropy", "tokens"), "mot": ("merge_entropy", "groups")}


def combine_stats(earlier: dict[str, Any], latest: dict[str, Any]) -> dict[str, Any]:
    """Two calls' statistics as one: counts and ``expert_load`` added, the entropy averaged by tokens (MoE)
    or groups (MoT); a call without any weighs nothing (its mean over nothing is NaN). Device tensors stay
    on the device: no sync."""
    kind = latest["kind"]
    combined = dict(latest)
    for key in (*SUMMED[kind], "expert_load"):
        if key in earlier and key in latest:
            combined[key] = earlier[key] + latest[key]
    mean, weight = AVERAGED[kind]
    if mean in earlier and mean in latest:
        before, now = earlier[weight], latest[weight]  # Python ints: the sizes of the two calls
        if before and not now:
            combined[mean] = earlier[mean]
        elif before and now:
            combined[mean] = (earlier[mean] * before + latest[mean] * now) / (before + now)
    return combined


class ForwardScope:
    """The converted model's forward pre-hook (``__call__``) and post-hook (``done``, always called) that
    open and close the scope for ``blocks``. A class, not a closure, so a converted model deep-copies and
    pickles; the state lives on the blocks (``Block.called_in_forward``: None outside the forward, then
    whether the block ran in it yet), the same at the start of every forward, so ``torch.compile`` does
    not recompile for it."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        for block in self.blocks:
            block.called_in_forward = False

    def done(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """After the forward, or an exception in it (an interrupt skips it: the next forward starts afresh,
        but calls of a block on its own add up until then)."""
        for block in self.blocks:
            block.called_in_forward = None


def install_forward_scope(model: nn.Module) -> None:
    """Hook ``model`` so that its forward is one scope for every block it holds, replacing the scope a
    previous conversion installed (which knew fewer blocks)."""
    from mixcompile.runtime.blocks.base import Block

    for module in model.modules():  # a scope inside would reopen the blocks in the middle of this forward
        remove_forward_hooks(module, _is_scope_hook)
    blocks = list(dict.fromkeys(m for m in model.modules() if isinstance(m, Block)))
    if blocks:
        scope = ForwardScope(blocks)
        model.register_forward_pre_hook(scope)
        model.register_forward_hook(scope.done, always_call=True)


def replace_in_forward_scopes(model: nn.Module, old: nn.Module, new: Block) -> None:
    """``new`` takes ``old``'s place in the scopes of ``model`` and its submodules (a block swapped in
    place, as :func:`mixcompile.to_token_choice` does). A scope above ``model`` is not found: blocks do not
    point back at it, so that a deep copy of one block does not copy every block of its model."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ForwardScope):
                hook.blocks = [new if block is old else block for block in hook.blocks]


def _is_scope_hook(hook: object) -> bool:
    """A scope's pre-hook (the scope) or post-hook (its bound ``done``)."""
    return isinstance(hook, ForwardScope) or isinstance(getattr(hook, "__self__", None), ForwardScope)
