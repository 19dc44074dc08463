"""Routing statistics and balancing state summed over the ranks of a data-parallel group.

Each rank routes its own tokens, so its statistics and load counters describe only its share of the batch;
these reductions give the global view, and keep the selection bias identical on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixcompile.runtime.calls import AVERAGED, SUMMED
from mixcompile.runtime.introspect import sparse_blocks, stats


def all_reduce_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, dict[str, Any]]:
    """:func:`mixcompile.stats` of the last forward on every rank of ``group``, combined.

    Counts (``tokens``, ``expert_load``, ``dropped_tokens``, ``dropped_assignments``, ``groups``,
    ``missing_members``) are summed; entropies are averaged weighted by tokens (MoE) or groups (MoT);
    ``aux_loss`` is the mean over ranks of each MoE block's weighted router losses (``None`` without
    losses). A rank whose batch was empty weighs nothing in the entropies and counts 0 in ``aux_loss``
    (its router losses are 0). A collective: call it on every rank, after a forward of the same model.
    """
    local = stats(model)
    blocks = sparse_blocks(model)
    world = dist.get_world_size(group)
    values: list[torch.Tensor] = []
    keys: list[tuple[str, str]] = []
    for path, block_stats in local.items():
        kind = block_stats["kind"]
        mean_key, weight_key = AVERAGED[kind]
        summed = {key: block_stats[key] for key in (*SUMMED[kind], "expert_load") if key in block_stats}
        if mean_key in block_stats:
            # A rank without tokens (groups) has a NaN mean of nothing; it weighs 0 and adds 0, not NaN.
            weight = block_stats[weight_key]
            summed[mean_key] = block_stats[mean_key] * weight if weight else 0.0
        loss = getattr(blocks[path], "last_aux_loss", None)
        if loss is not None:  # a rank without tokens counts 0 (what its loss adds to the DDP gradient)
            summed["aux_loss"] = loss.detach() / world if block_stats.get("tokens", 1) else 0.0
        for key, value in summed.items():
            values.append(torch.as_tensor(value, dtype=torch.float64, device="cpu").reshape(-1))
            keys.append((path, key))
    if not values:
        return {}
    flat = torch.cat(values).to(_device(model))
    dist.all_reduce(flat, group=group)
    result = {path: dict(block_stats) for path, block_stats in local.items()}
    for (path, key), chunk in zip(keys, flat.cpu().split([v.numel() for v in values]), strict=True):
        result[path][key] = chunk
    for block_stats in result.values():
        _finish(block_stats)
    return result


def _finish(block_stats: dict[str, Any]) -> None:
    """Summed float64 chunks back to the types :func:`mixcompile.stats` uses; weighted sums to means."""
    kind = block_stats["kind"]
    for key in SUMMED[kind]:
        block_stats[key] = round(block_stats[key].item())
    if "expert_load" in block_stats:
        block_stats["expert_load"] = block_stats["expert_load"].round().long()
    mean_key, weight_key = AVERAGED[kind]
    if mean_key in block_stats:
        block_stats[mean_key] = block_stats[mean_key].item() / max(block_stats[weight_key], 1)
    if kind == "moe":
        block_stats["aux_loss"] = block_stats["aux_loss"].item() if "aux_loss" in block_stats else None


def _device(model: nn.Module) -> torch.device:
    """Where collectives on this model's group take their tensors (CUDA for NCCL)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
