"""Expert parallelism: each rank of a group keeps a slice of every MoE block's experts.

Every rank routes its own tokens with its replicated router; the (token, expert) pairs travel to the rank
that holds the expert, are computed there, and come back to be combined with their routing weights, so the
router, shared experts and the rest of the model never see that the experts are elsewhere.
"""

from __future__ import annotations

import copy
import json
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from mixcompile.distributed.exchange import exchange_counts, exchange_rows
from mixcompile.errors import ConfigError
from mixcompile.runtime.blocks import MoEBlock
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.introspect import sparse_blocks, unwrapped
from mixcompile.runtime.kernels import Kernel
from mixcompile.runtime.routing import RoutingPlan


class ExpertParallel:
    """The runner :func:`parallelize` installs as ``MoEBlock.expert_parallel``.

    Rank ``r`` of ``group`` holds global experts ``[r * E/W, (r + 1) * E/W)``. ``grad_scale`` multiplies the
    gradient reaching the local experts (not the one going back to the tokens).
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int, grad_scale: float = 1.0) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // self.world
        self.grad_scale = grad_scale

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first local expert."""
        return self.rank * self.experts_per_rank

    def __call__(
        self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts, kernel: Kernel
    ) -> torch.Tensor:
        """Send each pair's token row to the rank of its expert, compute there, and combine the outputs
        back here, where the routing weights (and their gradient) live."""
        dest = plan.expert_index // self.experts_per_rank
        order = torch.argsort(dest, stable=True)
        token = plan.token_index[order]
        local_id = plan.expert_index[order] - dest[order] * self.experts_per_rank
        send = torch.bincount(dest, minlength=self.world)
        send_counts = send.tolist()
        recv_counts = exchange_counts(send, self.group).tolist()
        rows = exchange_rows(x[token], send_counts, recv_counts, self.group)
        ids = exchange_rows(local_id, send_counts, recv_counts, self.group)
        out = self._compute(rows, ids, experts, kernel)
        back = exchange_rows(out, recv_counts, send_counts, self.group)
        weight = plan.weight[order].to(x.dtype)
        return x.new_zeros(x.shape).index_add(0, token, back * weight[:, None])

    def _compute(
        self, rows: torch.Tensor, ids: torch.Tensor, experts: StackedExperts, kernel: Kernel
    ) -> torch.Tensor:
        """The local experts on the received rows, each row one (token, expert) pair with weight 1."""
        if rows.shape[0] == 0:
            empty: torch.Tensor = _EmptyOutput.apply(rows, *experts.parameters())
            return empty
        n = rows.shape[0]
        index = torch.arange(n, device=rows.device)
        local = RoutingPlan(index, ids, rows.new_ones(n), n, experts.num_experts, pairs_per_token=1)
        if self.grad_scale == 1.0:
            return kernel.moe(rows, local, experts)
        out = kernel.moe(_ScaleGrad.apply(rows, 1.0 / self.grad_scale), local, experts)
        scaled: torch.Tensor = _ScaleGrad.apply(out, self.grad_scale)
        return scaled

    def __deepcopy__(self, memo: dict[int, Any]) -> ExpertParallel:
        """A copy running over the same group: a deep copy of a parallelized model (an EMA, SWA's
        ``AveragedModel``) holds the same expert slice and exchanges with the same ranks. A process group
        cannot be copied; every rank must run the copy's forwards too (each is a collective)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = value if name == "group" else copy.deepcopy(value, memo)
        return new

    def __copy__(self) -> ExpertParallel:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(
            f"{self!r} cannot be pickled: it holds the torch.distributed process group its experts are "
            "exchanged over, and the block holds only this rank's experts. Save the model's state_dict on "
            "every rank instead (torch.save(model.state_dict(), f'ckpt_rank{rank}.pt'), loaded into a model "
            "parallelized the same way over as many ranks), or save the model before parallelize."
        )

    def __repr__(self) -> str:
        return (
            f"ExpertParallel(rank={self.rank}/{self.world}, experts=[{self.first_expert}, "
            f"{self.first_expert + self.experts_per_rank}) of {self.num_experts})"
        )


def parallelize(
    model: nn.Module, ep_group: dist.ProcessGroup | None = None, *, average_grads: bool = True
) -> nn.Module:
    """Shard the experts of every :class:`MoEBlock` of ``model`` over ``ep_group``, in place.

    Call it on every rank, with the same model. ``ep_group`` must span all ranks (a subgroup is refused);
    ``ep_group=None`` creates one new group over them, so the expert exchanges get their own communicator
    and never interleave with the gradient collectives of DDP or FSDP. Each block's ``experts`` become a
    copy of the local slice (its ``state_dict`` entries keep their names and hold ``E/W`` experts: rank
    ``r`` saves experts ``[r*E/W, (r+1)*E/W)``). ``average_grads`` scales the expert gradients by ``1/W``:
    they are then the gradient of the mean of the ranks' losses, as DDP and FSDP average the replicated
    parameters'; with ``False`` they are the gradient of the sum. MoT blocks are left alone (they shard
    over nothing).

    Call it before data parallelism (:func:`mixcompile.distributed.data_parallel`, FSDP2's ``fully_shard``),
    which is refused afterwards, and build the optimizer after it: it replaces the expert parameters, so an
    optimizer built before would hold (and step) the old, full ones.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("parallelize needs torch.distributed initialised first (init_process_group).")
    _check_not_data_parallel(model)
    blocks = {path: b for path, b in sparse_blocks(model).items() if isinstance(b, MoEBlock)}
    world = dist.get_world_size(ep_group)  # -1 on a rank outside the group
    if world != dist.get_world_size():
        if world < 1:
            raise ConfigError("parallelize: this rank is not in ep_group; pass ep_group=None (all ranks).")
        raise ConfigError(
            f"parallelize: ep_group has {world} of the {dist.get_world_size()} ranks. Expert parallelism "
            "over part of the world would replicate each expert slice across groups, and nothing averages "
            "those replicas (rank_local_state leaves expert shards to each rank): pass ep_group=None."
        )
    _check_same_model(blocks, ep_group, _collective_device(model, ep_group))  # before any local check
    for path, block in blocks.items():
        _check_shardable(path, block, world)
    group = dist.new_group() if ep_group is None else ep_group
    for block in blocks.values():
        runner = ExpertParallel(group, block.experts.num_experts, 1.0 / world if average_grads else 1.0)
        block.experts = _local_slice(block.experts, runner.first_expert, runner.experts_per_rank)
        block.expert_parallel = runner
    _record_for_ddp(model)
    return model


def expert_parallel_runner(block: nn.Module) -> ExpertParallel | None:
    """The runner of a block sharded by :func:`parallelize`, else ``None``."""
    runner = getattr(block, "expert_parallel", None)
    return runner if isinstance(runner, ExpertParallel) else None


def _describe(path: str, block: MoEBlock) -> dict[str, Any]:
    """What every rank's copy of a block must agree on for the expert exchanges to match."""
    runner = block.expert_parallel
    return {
        "path": path,
        "num_experts": getattr(runner, "num_experts", block.experts.num_experts),
        "top_k": getattr(block.router, "top_k", block.top_k),
        "d_model": block.experts.d_model,
        "d_hidden": block.experts.d_hidden,
        "parallelized": runner is not None,
    }


def _check_same_model(
    blocks: dict[str, MoEBlock], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Refuse, on every rank alike, a model whose MoE blocks differ between ranks (two small all-gathers).

    Each forward exchanges rows by block and expert index: different blocks, expert counts or top-k
    failed deep inside a kernel, aborted gloo, or ran on silently."""
    world = dist.get_world_size(group)
    mine = torch.tensor(
        list(json.dumps([_describe(path, block) for path, block in blocks.items()]).encode()),
        dtype=torch.uint8,
        device=device,
    )
    length = torch.tensor([mine.numel()], device=device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: mine.numel()] = mine
    received = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(received, padded, group=group)
    gathered = [
        json.loads(bytes(data[: int(n.item())].tolist()).decode())
        for data, n in zip(received, lengths, strict=True)
    ]
    first = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        difference = _first_difference(first, theirs, rank)
        if difference:
            raise ConfigError(
                f"parallelize: the model differs between ranks: {difference}. Every rank must build the "
                "same model (same MoE blocks, expert counts and top_k) before parallelize."
            )


def _collective_device(model: nn.Module, group: dist.ProcessGroup | None) -> torch.device:
    """Where this rank's setup collectives take their tensors: the model's device, or this rank's current
    CUDA device for a CUDA-only backend (NCCL) while the model is still on the CPU (or meta device)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _first_difference(first: list[dict[str, Any]], theirs: list[dict[str, Any]], rank: int) -> str:
    for index, (a, b) in enumerate(zip(first, theirs, strict=False)):
        if a["path"] != b["path"]:
            return (
                f"MoE block #{index} is at {a['path'] or '<root>'!r} on rank 0 but at "
                f"{b['path'] or '<root>'!r} on rank {rank}"
            )
        for key in a:
            if a[key] != b[key]:
                return (
                    f"the MoE block at {a['path'] or '<root>'!r} has {key}={a[key]!r} on rank 0 but "
                    f"{key}={b[key]!r} on rank {rank}"
                )
    if len(first) != len(theirs):
        return (
            f"rank 0 has {len(first)} MoE blocks ({[d['path'] for d in first]}), rank {rank} has "
            f"{len(theirs)} ({[d['path'] for d in theirs]})"
        )
    return ""


def _record_for_ddp(model: nn.Module) -> None:
    """Name the expert slices (and load counters) in DDP's ignore list of ``model``, so that a plain
    ``DistributedDataParallel(model)`` leaves them alone too (it broadcast rank 0's slice over the others
    and averaged different experts' gradients). DDP of a module wrapping ``model`` does not see this:
    :func:`mixcompile.distributed.data_parallel` is the way that works for any wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    from mixcompile.distributed.data_parallel import rank_local_state

    model = unwrapped(model)
    names = set(rank_local_state(model))
    names |= {f"_orig_mod.{name}" for name in names}  # DDP(torch.compile(model)) reads model's list
    names |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))


def _check_not_data_parallel(model: nn.Module) -> None:
    """Refuse a model already under data parallelism: DDP (or FSDP2) registered the full expert parameters
    that parallelize replaces, and failed only at the second step, with a misleading "Expected to have
    finished reduction in the prior iteration" about find_unused_parameters."""
    from mixcompile.distributed.data_parallel import data_parallel_wrapping

    wrapping = data_parallel_wrapping(model)
    if wrapping is not None:
        raise ConfigError(
            f"parallelize: {wrapping}. That wrapper holds the full expert parameters, which parallelize "
            "would replace with this rank's slice (DDP then fails at the second step, asking for "
            "find_unused_parameters). Call parallelize first on the bare model, then "
            "mixcompile.distributed.data_parallel (or fully_shard), and build the optimizer after both."
        )


def _check_shardable(path: str, block: MoEBlock, world: int) -> None:
    where = f"MoE block {path or '<root>'!r}"
    if block.expert_parallel is not None:
        raise ConfigError(f"{where} already runs its experts in parallel; parallelize a model only once.")
    num_experts = block.experts.num_experts
    if num_experts % world:
        raise ConfigError(
            f"{where} has {num_experts} experts, which {world} expert-parallel ranks cannot share evenly; "
            f"use a number of experts divisible by {world}."
        )


def _local_slice(experts: StackedExperts, first: int, count: int) -> StackedExperts:
    """A new StackedExperts holding a copy of experts ``[first, first + count)``."""
    w = experts.w_in
    local = StackedExperts(
        count,
        experts.d_model,
        experts.d_hidden,
        activation=experts.activation,
        gated=experts.gated,
        bias=experts.bias,
        hidden_dropout=experts.hidden_dropout,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        for name, param in experts.named_parameters():
            mine = getattr(local, name)
            mine.copy_(param[first : first + count])
            mine.requires_grad_(param.requires_grad)
    return local.train(experts.training)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class _EmptyOutput(torch.autograd.Function):
    """The output of a rank that received no rows, kept in the autograd graph like a computed one.

    Every rank must join the backward exchanges; a tensor with no autograd history would skip them here
    and leave the other ranks waiting.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*params)
        return torch.zeros_like(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Zeros, not None: one process gives an expert without tokens a zero gradient, and an optimizer
        # skips a parameter whose gradient is None (no weight decay, no momentum step) where it would not.
        zeros = [
            torch.zeros_like(p) if ctx.needs_input_grad[1 + i] else None
            for i, p in enumerate(ctx.saved_tensors)
        ]
        return (grad, *zeros)
