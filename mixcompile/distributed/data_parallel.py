"""Data parallelism over models with sparse blocks: what DDP and FSDP must leave to each rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixcompile.distributed.expert_parallel import expert_parallel_runner
from mixcompile.runtime.introspect import balancing_routers, sparse_blocks


def rank_local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers whose value differs between ranks by design, by name in ``model``.

    - the expert slices of blocks sharded by :func:`parallelize` (each rank holds different experts);
    - the ``load_since_update`` counters of bias-balancing routers (each rank counts its own tokens until
      :func:`mixcompile.update_routing_bias` with ``group=`` sums them).

    DDP must neither average nor broadcast them, and FSDP must not shard the expert slices again
    (``fully_shard(model, ignored_params=...)`` with the parameters among these).

    The names are those of ``model`` itself, found by tensor identity: a wrapper (``torch.compile``'s
    ``_orig_mod.``, an ``nn.Sequential`` around the model, ...) prefixes them as DDP sees them. A tensor
    reachable under several names (tied) is listed under each.
    """
    wanted: dict[int, torch.Tensor] = {}
    for block in sparse_blocks(model).values():
        if expert_parallel_runner(block) is not None:
            wanted.update((id(param), param) for param in block.experts.parameters())
    for router in balancing_routers(model).values():
        wanted[id(router.load_since_update)] = router.load_since_update
    local: dict[str, torch.Tensor] = {}
    named = (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        if id(tensor) in wanted:
            local[name] = tensor
    return local


def data_parallel(
    model: nn.Module, group: dist.ProcessGroup | None = None, **ddp_options: Any
) -> DistributedDataParallel:
    """``DistributedDataParallel(model)`` leaving :func:`rank_local_state` alone; options pass on to DDP."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(rank_local_state(model)))
    return DistributedDataParallel(model, process_group=group, **ddp_options)
