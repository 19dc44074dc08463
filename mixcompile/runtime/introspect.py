"""Reading the sparse blocks of a model after a forward: aux losses, routing statistics, bias updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixcompile.errors import ConfigError
from mixcompile.runtime.blocks import Block, MoEBlock
from mixcompile.runtime.routing import LearnedRouter

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def sparse_blocks(model: nn.Module) -> dict[str, Block]:
    """Every MoE / MoT block in ``model``, by module path (for a wrapper, the paths in the model it wraps:
    see :func:`unwrapped`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    modules = unwrapped(model).named_modules()
    return {name: module for name, module in modules if isinstance(module, Block)}


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, ``DistributedDataParallel`` and ``nn.DataParallel`` wrappers (in
    any nesting): a wrapper runs that model unchanged, so its blocks, the paths a save records and the saved
    weights are that model's."""
    while True:
        inner = _wrapped_model(model)
        if inner is None:
            return model
        model = inner


def _wrapped_model(model: nn.Module) -> nn.Module | None:
    """The model one wrapper holds, or ``None`` when ``model`` is not a wrapper."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        inner = model._orig_mod
    elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        inner = model.module
    else:
        return None
    return inner if isinstance(inner, nn.Module) else None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The summed, already-weighted router losses of the last forward; add it to the training loss. A block
    the converted model's forward called several times (shared layers) holds the sum over its calls.

    Zero (a tensor) when the model has no MoE block or its routers have no losses, and after a forward in
    eval mode (routers compute their losses in training mode only).
    """
    total: torch.Tensor | None = None
    for path, block in sparse_blocks(model).items():
        loss = getattr(block, "last_aux_loss", None)
        if loss is None:
            continue
        router_trains = any(p.requires_grad for p in getattr(block, "router", block).parameters())
        if torch.is_grad_enabled() and router_trains and not loss.requires_grad:
            raise ConfigError(
                f"aux_loss: the router losses of the MoE block at {path or '<root>'!r} have no gradient: its "
                "last forward ran without autograd, so they would not train its router. Reentrant activation "
                "checkpointing runs forwards so (recomputing them only in backward): use use_reentrant=False "
                "(torch.utils.checkpoint, or activation_checkpointing_kwargs={'use_reentrant': False} in "
                "transformers). Read the value under torch.no_grad() for logging."
            )
        total = loss if total is None else total + loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-block statistics of the last forward, by module path (over every call of a block the converted
    model's forward called several times: counts added, entropies averaged).

    MoE: ``expert_load`` (tokens per expert), ``dropped_tokens`` (tokens no expert processed),
    ``dropped_assignments`` (picks over capacity), ``routing_entropy`` (mean, nats).
    MoT: ``groups``, ``missing_members`` (masked slots of an incomplete last group), ``merge_entropy``.
    Blocks keep them as device tensors (no sync, no ``torch.compile`` graph break); this reads them back.
    """
    return {path: dict(block.last_stats) for path, block in sparse_blocks(model).items() if block.last_stats}


def balancing_routers(model: nn.Module) -> dict[str, LearnedRouter]:
    """The routers that use aux-loss-free balancing, by the path of their block."""
    return {
        path: block.router
        for path, block in sparse_blocks(model).items()
        if isinstance(block, MoEBlock)
        and isinstance(block.router, LearnedRouter)
        and block.router.bias_balancing
    }


def update_routing_bias(model: nn.Module, *, group: ProcessGroup | None = None) -> int:
    """Apply one auxiliary-loss-free balancing update (DeepSeek-V3) to every router that uses it.

    Call it after each optimiser step. Under data or expert parallelism pass the process ``group``: the
    expert loads are then summed over it first (a collective: call it on every rank), so every rank ends
    with the same bias. Returns the number of routers updated.
    """
    routers = list(balancing_routers(model).values())
    if group is not None and routers:
        import torch.distributed as dist

        loads = torch.cat([router.load_since_update for router in routers])
        dist.all_reduce(loads, group=group)
        for router, load in zip(routers, torch.split(loads, [r.num_experts for r in routers]), strict=True):
            router.load_since_update.copy_(load)
    for router in routers:
        router.update_bias()
    return len(routers)
