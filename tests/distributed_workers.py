"""Jobs for tests/distributed/test_distributed.py, run in spawned processes, and the models and data both
sides build.

Everything is built from fixed seeds, so the parent computes its single-process reference from the same
weights and data as the ranks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mixcompile as mc
from mixcompile import distributed as mcd

D, H, E = 8, 12, 4
LR = 0.1

# Expert-parallel cases. ``gate_col`` overwrites the router weights of feature 0, which is set to
# ``3 * sign[rank]`` in every token, to force where tokens go.
EP_CASES: dict[str, dict] = {
    # expert 3 gets every token of rank 1 and none of rank 0; gated experts with biases, a shared expert
    "uneven": dict(
        block=dict(gated=True, bias=True, num_shared_experts=1),
        gate_col=[0.0, 0.0, 0.0, -2.0],
        sign=(1, -1),
        shapes=((1, 5), (3, 3)),
        average_grads=True,
    ),
    # every token goes to experts 0 and 1: rank 1 receives no rows at all
    "idle_rank": dict(block={}, gate_col=[2.0, 2.0, -2.0, -2.0], sign=(1, 1), shapes=((2, 4), (1, 3))),
    # Switch top-1 over capacity: dropped tokens; summed (not averaged) expert gradients
    "switch_capacity": dict(
        block=dict(router="switch", top_k=1, router_options={"capacity_factor": 0.5}),
        gate_col=[1.0, 0.0, 0.0, 0.0],
        sign=(1, -1),
        shapes=((2, 6), (2, 5)),
        average_grads=False,
    ),
    # expert choice: pairs come grouped by expert, not by token
    "expert_choice": dict(
        block=dict(router="expert_choice"), gate_col=None, sign=(1, 1), shapes=((3, 4), (2, 4))
    ),
}


def moe_block(case: str) -> mc.MoEBlock:
    spec = EP_CASES[case]
    torch.manual_seed(0)
    options = {"top_k": 2, "kernel": "torch", **spec["block"]}
    block = mc.MoEBlock(D, H, E, **options)
    if spec["gate_col"] is not None:
        with torch.no_grad():
            block.router.gate.weight[:, 0] = torch.tensor(spec["gate_col"])
    return block


def ep_inputs(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens and the upstream gradient of the block's output."""
    spec = EP_CASES[case]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(*spec["shapes"][rank], D, generator=g)
    x[..., 0] = 3.0 * spec["sign"][rank]
    return x, torch.randn(x.shape, generator=g)


class Net(nn.Module):
    """A small residual stack with one MoE block (bias balancing on) and one MoT block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        router_options = {"bias_balancing": True, "bias_update_rate": 0.003}
        self.moe = mc.MoEBlock(D, H, E, top_k=2, router_options=router_options, kernel="torch")
        self.mot = mc.MoTBlock(D, H, E, group_size=2, kernel="torch")
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.moe(h)
        h = h + self.mot(h)
        return self.out(h)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def net_batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data per rank; rank 0 has 3 sequences, so its last MoT group is incomplete."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randn(3 + rank, 4, D, generator=g) + rank
    return x, torch.randn(x.shape, generator=g)


def train(model: nn.Module, forward: nn.Module, rank: int, steps: int, micro: int) -> list[torch.Tensor]:
    """SGD steps of ``micro`` accumulated micro-batches, balancing the routers after each step; returns the
    MoE block's load counter as this rank saw it before each update.

    No ``no_sync``: DDP then broadcasts buffers before every forward, which must spare the load counters.
    """
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    counted = []
    for step in range(steps):
        for m in range(micro):
            x, target = net_batch(rank, step, m)
            loss = F.mse_loss(forward(x), target) + mc.aux_loss(model)
            loss.backward()
        opt.step()
        opt.zero_grad()
        counted.append(model.moe.router.load_since_update.clone())
        mc.update_routing_bias(model, group=dist.group.WORLD)
    return counted


def expert_parallel_job(rank: int, world: int) -> dict:
    results = {}
    for case in EP_CASES:
        block = moe_block(case)
        mcd.parallelize(block, average_grads=EP_CASES[case].get("average_grads", True))
        x, grad_out = ep_inputs(case, rank)
        x.requires_grad_(True)
        y = block(x)
        (y * grad_out).sum().backward()
        grads = {n: p.grad for n, p in block.named_parameters()}  # None kept: an idle rank's experts need 0
        results[case] = {
            "y": y.detach(),
            "x_grad": x.grad,
            "grads": grads,
            "stats": mcd.all_reduce_stats(block),
            "local_load": block.last_stats["expert_load"],
        }
    try:
        mcd.parallelize(nn.Sequential(nn.Linear(D, D), mc.MoEBlock(D, H, 3, kernel="torch")))
    except mc.ConfigError as exc:
        results["indivisible_error"] = str(exc)
    alone, _ = dist.new_subgroups(1)  # every rank calls it; each gets a group of itself
    try:
        mcd.parallelize(moe_block("idle_rank"), alone)
    except mc.ConfigError as exc:
        results["subgroup_error"] = str(exc)
    return results


def ddp_job(rank: int, world: int, expert_parallel: bool, steps: int, micro: int) -> dict:
    net = make_net()
    if expert_parallel:
        mcd.parallelize(net)
    counted = train(net, mcd.data_parallel(net), rank, steps, micro)
    return {
        "counted": counted,
        "state": {n: t.detach().clone() for n, t in net.state_dict().items()},
        "local_load": net.moe.last_stats["expert_load"],
        "stats": mcd.all_reduce_stats(net),
        "rank_local": sorted(mcd.rank_local_state(net)),
    }


def fsdp_job(rank: int, world: int, expert_parallel: bool, steps: int, micro: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = make_net()
    if expert_parallel:
        mcd.parallelize(net)
    ignored = {t for t in mcd.rank_local_state(net).values() if isinstance(t, nn.Parameter)}
    for module in (net.moe, net.mot, net):
        fully_shard(module, ignored_params=ignored or None)
    counted = train(net, net, rank, steps, micro)
    state = {}
    for name, tensor in net.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        state[name] = full.detach().clone()
    return {"state": state, "counted": counted, "sharded": isinstance(net.inp.weight, DTensor)}


def _attempt(case: Callable[[], dict]) -> dict:
    """A case's result, or the error it raised (as text), so that one failing case does not hide others."""
    try:
        return case()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def _shards_survive_ddp(rank: int, wrap: Callable[[nn.Module], nn.Module]) -> dict:
    """Construct DDP (which broadcasts rank 0's state over the others) over ``wrap(parallelized net)``;
    do this rank's expert slice and load counter survive?"""
    net = make_net()
    mcd.parallelize(net)
    with torch.no_grad():
        net.moe.router.load_since_update.fill_(rank + 1.0)
    before = {n: t.detach().clone() for n, t in mcd.rank_local_state(net).items()}
    wrap(net)
    after = mcd.rank_local_state(net)
    return {"survived": {n: torch.equal(t, after[n]) for n, t in before.items()}}


def _empty_rank_training(rank: int) -> dict:
    """Rank 1 has an empty batch: one DDP step over an expert-parallel net with a MoT block."""
    net = make_net()
    mcd.parallelize(net)
    ddp = mcd.data_parallel(net)
    x = torch.randn(3 if rank == 0 else 0, 4, D, generator=torch.Generator().manual_seed(rank))
    y = ddp(x)
    aux = mc.aux_loss(net)
    (y.square().sum() + aux).backward()
    return {
        "aux_loss": aux.item(),
        "grads_finite": {n: bool(p.grad.isfinite().all()) for n, p in net.named_parameters()},
        "stats": mcd.all_reduce_stats(net),
    }


def _copies(rank: int) -> dict:
    """A deep copy (EMA), SWA's AveragedModel and a pickle of a parallelized model."""
    import copy
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), mc.MoEBlock(D, H, E, top_k=2, kernel="torch"))
    mcd.parallelize(model)
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(rank))
    ema = copy.deepcopy(model)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    result = {
        "same_group": ema[1].expert_parallel.group is model[1].expert_parallel.group,
        "own_slice": ema[1].experts.w_in is not model[1].experts.w_in
        and torch.equal(ema[1].experts.w_in, model[1].experts.w_in),
        "ema_equal": torch.equal(ema(x), model(x)),
        "averaged_equal": torch.equal(averaged(x), model(x)),
    }
    try:
        torch.save(model, io.BytesIO())
        result["pickle_error"] = None
    except Exception as exc:  # noqa: BLE001
        result["pickle_error"] = f"{type(exc).__name__}: {exc}"
    return result


def robustness_job(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    return {
        "compiled": _attempt(
            lambda: _shards_survive_ddp(rank, lambda net: mcd.data_parallel(torch.compile(net)))
        ),
        "plain_ddp": _attempt(lambda: _shards_survive_ddp(rank, DistributedDataParallel)),
        "empty_rank": _attempt(lambda: _empty_rank_training(rank)),
        "copies": _attempt(lambda: _copies(rank)),
    }


def mismatch_job(rank: int, world: int) -> dict:
    """Models that differ between ranks: parallelize must refuse them alike on every rank."""
    cases = {
        "experts": lambda: nn.Sequential(mc.MoEBlock(D, H, 4 if rank == 0 else 8, kernel="torch")),
        "blocks": lambda: nn.Sequential(*(mc.MoEBlock(D, H, E, kernel="torch") for _ in range(1 + rank))),
        "top_k": lambda: mc.MoEBlock(D, H, E, top_k=1 + rank, kernel="torch"),
    }
    errors = {}
    for name, build in cases.items():
        try:
            mcd.parallelize(build())
            errors[name] = None
        except mc.ConfigError as exc:
            errors[name] = str(exc)
    return errors


JOBS = {
    "expert_parallel": expert_parallel_job,
    "ddp": ddp_job,
    "fsdp": fsdp_job,
    "robustness": robustness_job,
    "mismatch": mismatch_job,
}


def main(rank: int, world: int, workdir: str, job: str, *args: object) -> None:
    """Spawn entry point: join a gloo group on loopback, run ``job``, save its result for the parent."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback())
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = JOBS[job](rank, world, *args)
        # Every rank done communicating before any tears its group down: a rank whose peer had already
        # exited aborted once in CI ("terminate called without an active exception", SIGABRT, FSDP2 job).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(workdir) / f"rank{rank}.pt")
    # Out without the interpreter's teardown: with the result saved, a gloo / FSDP thread torn down there
    # still aborted a rank in CI now and then ("terminate called without an active exception", SIGABRT,
    # both results written).
    os._exit(0)


def _loopback() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"
