"""Expert parallelism, DDP and FSDP2 over 2 gloo processes on loopback, against single-process references."""

from __future__ import annotations

import inspect
import time

import distributed_workers as dw
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import rel_err

import mixcompile as mc
from mixcompile import distributed as mcd

WORLD = 2
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)


def run_workers(tmp_path, job: str, *args: object) -> list[dict]:
    """Run ``job`` on WORLD spawned ranks; worker errors re-raise here, a hang fails after TIMEOUT_S."""
    context = mp.start_processes(
        dw.main, args=(WORLD, str(tmp_path), job, *args), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed job {job!r} did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def ep_reference(case: str) -> dict:
    """Single process, all experts: per-rank outputs and grads; expert grads over all ranks' losses."""
    block = dw.moe_block(case)
    names = [n for n, _ in block.named_parameters()]
    params = list(block.parameters())
    ranks = []
    for rank in range(WORLD):
        x, grad_out = dw.ep_inputs(case, rank)
        x.requires_grad_(True)
        y = block(x)
        x_grad, *grads = torch.autograd.grad((y * grad_out).sum(), [x, *params], allow_unused=True)
        zero_if_unused = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        aux = block.last_aux_loss
        ranks.append(
            {
                "y": y.detach(),
                "x_grad": x_grad,
                "grads": dict(zip(names, zero_if_unused, strict=True)),
                "stats": block.last_stats,
                "aux_loss": None if aux is None else aux.item(),
            }
        )
    scale = 1.0 / WORLD if dw.EP_CASES[case].get("average_grads", True) else 1.0
    experts = {n: scale * sum(r["grads"][n] for r in ranks) for n in names if n.startswith("experts.")}
    return {"ranks": ranks, "experts": experts}


def test_expert_parallel_matches_single_process(tmp_path):
    results = run_workers(tmp_path, "expert_parallel")
    per_rank = dw.E // WORLD
    for case in dw.EP_CASES:
        ref = ep_reference(case)
        for rank, result in enumerate(results):
            got, want = result[case], ref["ranks"][rank]
            where = f"{case}, rank {rank}"
            assert rel_err(got["y"], want["y"]) < 1e-5, where
            assert rel_err(got["x_grad"], want["x_grad"]) < 1e-5, where
            for name, grad in got["grads"].items():
                if name.startswith("experts."):  # zeros where no token came, as in one process: not None
                    assert grad is not None, (where, name)
                    expected = ref["experts"][name][rank * per_rank : (rank + 1) * per_rank]
                else:  # replicated: this rank's own loss only
                    grad = torch.zeros_like(want["grads"][name]) if grad is None else grad
                    expected = want["grads"][name]
                assert grad.shape == expected.shape, (where, name)
                assert rel_err(grad, expected) < 1e-5, (where, name)
            stats = got["stats"][""]
            assert torch.equal(stats["expert_load"], sum(r["stats"]["expert_load"] for r in ref["ranks"]))
            for key in ("tokens", "dropped_tokens", "dropped_assignments"):
                assert stats[key] == sum(r["stats"][key] for r in ref["ranks"]), (where, key)
            losses = [r["aux_loss"] for r in ref["ranks"]]
            assert stats["aux_loss"] == pytest.approx(sum(losses) / WORLD, rel=1e-5), where
    # the forced loads: expert 3 idle on rank 0 only; rank 1 of idle_rank receives nothing
    loads = [r["uneven"]["local_load"] for r in results]
    assert loads[0][3] == 0 and loads[1][3] > 0
    assert sum(r["idle_rank"]["local_load"][per_rank:].sum() for r in results) == 0
    assert sum(r["switch_capacity"]["stats"][""]["dropped_tokens"] for r in results) > 0
    message = results[0]["indivisible_error"]
    assert "'1'" in message and "3 experts" in message and "divisible by 2" in message
    assert "ep_group has 1 of the 2 ranks" in results[0]["subgroup_error"]


def reference_training(steps: int, micro: int) -> dict:
    """Single process: each step averages the ranks' losses over every micro-batch, as DDP does, and
    balances the router on the load of all of them."""
    net = dw.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=dw.LR)
    counted = []
    for step in range(steps):
        for m in range(micro):
            for rank in range(WORLD):
                x, target = dw.net_batch(rank, step, m)
                loss = F.mse_loss(net(x), target) + mc.aux_loss(net)
                (loss / WORLD).backward()
        opt.step()
        opt.zero_grad()
        counted.append(net.moe.router.load_since_update.clone())
        mc.update_routing_bias(net)
    return {"state": {n: t.detach() for n, t in net.state_dict().items()}, "counted": counted}


def check_against_reference(results: list[dict], ref: dict, expert_parallel: bool) -> None:
    """Same parameters and buffers as the reference (expert slices where sharded), same on every rank;
    the ranks' own load counts add up to the reference's before each balancing update."""
    for step, load in enumerate(ref["counted"]):
        assert torch.equal(sum(r["counted"][step] for r in results), load), f"load counted in step {step}"
    per_rank = dw.E // WORLD
    for rank, result in enumerate(results):
        for name, tensor in result["state"].items():
            expected = ref["state"][name]
            if expert_parallel and name.startswith("moe.experts."):
                expected = expected[rank * per_rank : (rank + 1) * per_rank]
            else:
                assert torch.equal(tensor, results[0]["state"][name]), f"{name} differs between ranks"
            assert tensor.shape == expected.shape, name
            assert rel_err(tensor, expected) < 1e-5 or torch.equal(tensor, expected), (rank, name)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["replicated", "expert_parallel"])
def test_ddp_training_matches_single_process(tmp_path, expert_parallel):
    steps, micro = 2, 2
    results = run_workers(tmp_path, "ddp", expert_parallel, steps, micro)
    check_against_reference(results, reference_training(steps, micro), expert_parallel)
    # The ranks routed different data, yet their selection bias (checked above) moved identically.
    assert not torch.equal(results[0]["local_load"], results[1]["local_load"])
    assert results[0]["state"]["moe.router.selection_bias"].abs().sum() > 0
    stats = results[0]["stats"]
    assert torch.equal(stats["moe"]["expert_load"], sum(r["local_load"] for r in results))
    assert stats["mot"]["groups"] == 2 * 2 and stats["mot"]["missing_members"] == 1  # batches of 3 and 4
    local = ["moe.router.load_since_update"]
    if expert_parallel:
        local += [f"moe.experts.{name}" for name in ("b_in", "b_out", "w_gate", "w_in", "w_out")]
        local = [n for n in local if n in results[0]["state"]]
    assert results[0]["rank_local"] == sorted(local)


def fsdp2_skip_reason() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        return f"fully_shard of torch {torch.__version__} cannot leave expert shards out (no ignored_params)"
    return None


@pytest.mark.skipif(fsdp2_skip_reason() is not None, reason=str(fsdp2_skip_reason()))
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["replicated", "expert_parallel"])
def test_fsdp2_step_matches_single_process(tmp_path, expert_parallel):
    results = run_workers(tmp_path, "fsdp", expert_parallel, 1, 1)
    assert results[0]["sharded"]
    check_against_reference(results, reference_training(1, 1), expert_parallel)


def test_parallelize_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(mc.ConfigError, match="init_process_group"):
        mcd.parallelize(mc.MoEBlock(8, 12, 4))


def test_rank_local_state_without_expert_parallelism():
    net = dw.make_net()
    assert list(mcd.rank_local_state(net)) == ["moe.router.load_since_update"]
    assert mcd.rank_local_state(mc.MoEBlock(8, 12, 4)) == {}


def test_a_model_with_sharded_experts_is_not_saved_as_a_directory(tmp_path):
    """A parallelized block holds E/W experts: a directory of it would not load (it did save before)."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model = mc.convert(torch.nn.Sequential(mlp), strategy="moe", num_experts=4, top_k=2)
    (block,) = mc.sparse_blocks(model).values()
    block.expert_parallel = "ExpertParallel(rank=0/2, experts=[0, 2) of 4)"  # stands for parallelize's runner
    with pytest.raises(
        mc.ConfigError, match=r"at '0' holds only this rank's experts.*save before parallelize"
    ):
        mc.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def robustness(tmp_path_factory) -> list[dict]:
    return run_workers(tmp_path_factory.mktemp("robustness"), "robustness")


@pytest.mark.parametrize("how", ["compiled", "plain_ddp"])
def test_ddp_leaves_each_ranks_shards_alone_under_a_wrapper(robustness, how):
    """data_parallel(torch.compile(model)) named the shards without the wrapper's '_orig_mod.' (DDP then
    broadcast rank 0's expert slice and load counter over rank 1's); a plain DDP(model) of the parallelized
    model did the same."""
    for rank, result in enumerate(robustness):
        assert "error" not in result[how], result[how]
        survived = result[how]["survived"]
        assert set(survived) >= {"moe.experts.w_in", "moe.router.load_since_update"}
        assert all(survived.values()), (rank, survived)


def test_rank_local_state_names_what_a_wrapper_holds():
    net = dw.make_net()
    assert list(mcd.rank_local_state(torch.compile(net))) == ["_orig_mod.moe.router.load_since_update"]
    outer = torch.nn.Sequential(net)
    assert list(mcd.rank_local_state(outer)) == ["0.moe.router.load_since_update"]


def test_an_empty_rank_keeps_losses_gradients_and_stats_finite(robustness):
    """A rank without tokens: its router losses were NaN (means over no tokens), which DDP spread to every
    rank's gradients, and its NaN entropies poisoned the global statistics."""
    for rank, result in enumerate(robustness):
        got = result["empty_rank"]
        assert "error" not in got, got
        assert got["aux_loss"] == 0.0 if rank == 1 else got["aux_loss"] > 0
        assert all(got["grads_finite"].values()), (rank, got["grads_finite"])
        moe, mot = got["stats"]["moe"], got["stats"]["mot"]
        assert moe["tokens"] == 12 and mot["groups"] == 2  # rank 0: 3 sequences, groups of 2
        assert moe["routing_entropy"] > 0 and mot["merge_entropy"] > 0
        assert moe["aux_loss"] == pytest.approx(robustness[0]["empty_rank"]["aux_loss"] / WORLD)


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
def test_router_losses_of_an_empty_batch_are_zero_with_a_gradient_path(router):
    torch.manual_seed(0)
    block = mc.MoEBlock(8, 12, 4, router=router, top_k=1 if router == "switch" else 2, kernel="torch")
    y = block(torch.randn(0, 3, 8))
    aux = mc.aux_loss(block)
    assert aux.item() == 0.0 and aux.requires_grad
    (y.sum() + aux).backward()
    assert torch.equal(block.router.gate.weight.grad, torch.zeros_like(block.router.gate.weight))


def test_a_parallelized_model_deep_copies_over_the_same_group(robustness):
    """An EMA copy / SWA AveragedModel failed: the runner's ProcessGroup does not pickle. A copy now
    shares the group and has its own expert slice; pickling the whole model says what to do instead."""
    for rank, result in enumerate(robustness):
        got = result["copies"]
        assert "error" not in got, got
        assert got["same_group"] and got["own_slice"], (rank, got)
        assert got["ema_equal"] and got["averaged_equal"], (rank, got)
        assert got["pickle_error"] is not None and "state_dict" in got["pickle_error"], got["pickle_error"]


def test_parallelize_refuses_a_model_that_differs_between_ranks(tmp_path):
    """Different expert counts failed deep in a kernel, different block counts aborted gloo, different
    top_k ran on: each rank now raises the same ConfigError at parallelize, naming the difference."""
    results = run_workers(tmp_path, "mismatch")
    assert results[0] == results[1]
    errors = results[0]
    assert "'0' has num_experts=4 on rank 0 but num_experts=8 on rank 1" in errors["experts"]
    assert "rank 0 has 1 MoE blocks (['0']), rank 1 has 2 (['0', '1'])" in errors["blocks"]
    assert "top_k=1 on rank 0 but top_k=2 on rank 1" in errors["top_k"]
