"""Data parallelism over models with sparse blocks: what DDP and FSDP must leave to each rank."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixcompile.distributed.expert_parallel import expert_parallel_runner
from mixcompile.runtime.introspect import balancing_routers, sparse_blocks

# Every module that data_parallel wrapped, and each module inside it, to its (weakly held) DDP wrapper:
# parallelize must refuse them, and DDP leaves no mark of its own on the module it wraps.
_WRAPPED_BY: weakref.WeakKeyDictionary[nn.Module, weakref.ref[DistributedDataParallel]] = (
    weakref.WeakKeyDictionary()
)


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
    wrapper = DistributedDataParallel(model, process_group=group, **ddp_options)
    for module in model.modules():
        _WRAPPED_BY[module] = weakref.ref(wrapper)
    return wrapper


def data_parallel_wrapping(model: nn.Module) -> str | None:
    """Where ``model`` is already under data parallelism, in words, else ``None``: a DDP or
    ``nn.DataParallel`` (or FSDP2 ``fully_shard``) module in it, or a live :func:`data_parallel` wrapper
    around it or around one of its modules."""
    fsdp_module = _fsdp_module_class()
    for path, module in model.named_modules():
        where = f"the module at {path!r}" if path else f"the model ({type(module).__name__})"
        if isinstance(module, DistributedDataParallel | nn.DataParallel):
            return f"{where} is a {type(module).__name__}"
        if fsdp_module is not None and isinstance(module, fsdp_module):
            return f"{where} is sharded by FSDP2's fully_shard"
        wrapper = _WRAPPED_BY.get(module)
        if wrapper is not None and wrapper() is not None:
            return f"{where} is wrapped by the DistributedDataParallel that data_parallel made"
    return None


def _fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule`` (the class ``fully_shard`` mixes in), where this torch has it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule
