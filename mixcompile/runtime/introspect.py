"""Reading the sparse blocks of a model after a forward: aux losses, routing statistics, bias updates."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixcompile.runtime.blocks import Block, MoEBlock
from mixcompile.runtime.routing import Router


def sparse_blocks(model: nn.Module) -> dict[str, Block]:
    """Every MoE / MoT block in ``model``, by module path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    return {name: module for name, module in model.named_modules() if isinstance(module, Block)}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The summed, already-weighted router losses of the last forward; add it to the training loss.

    Zero (a tensor) when the model has no MoE block or its routers have no losses.
    """
    total: torch.Tensor | None = None
    for block in sparse_blocks(model).values():
        loss = getattr(block, "last_aux_loss", None)
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-block statistics of the last forward, by module path.

    MoE: ``expert_load`` (tokens per expert), ``dropped_tokens`` (tokens no expert processed),
    ``dropped_assignments`` (picks over capacity), ``routing_entropy`` (mean, nats).
    MoT: ``groups``, ``missing_members`` (masked slots of an incomplete last group), ``merge_entropy``.
    Blocks keep them as device tensors (no sync, no ``torch.compile`` graph break); this reads them back.
    """
    return {path: dict(block.last_stats) for path, block in sparse_blocks(model).items() if block.last_stats}


def update_routing_bias(model: nn.Module) -> int:
    """Apply one auxiliary-loss-free balancing update (DeepSeek-V3) to every router that uses it.

    Call it after each optimiser step. Returns the number of routers updated.
    """
    updated = 0
    for block in sparse_blocks(model).values():
        router = getattr(block, "router", None)
        if isinstance(block, MoEBlock) and isinstance(router, Router) and router.bias_balancing:
            router.update_bias()
            updated += 1
    return updated
