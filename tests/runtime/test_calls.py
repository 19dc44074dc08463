"""A block that one forward of its converted model calls several times (a layer shared across depth, as
ALBERT's) keeps the router losses and statistics of every call, not only the last one's."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import mixcompile as mc
from mixcompile.runtime.introspect import sparse_blocks

CALLS = 3


class Looped(nn.Module):
    """One FFN applied ``CALLS`` times, with a residual (a universal / looped transformer's shape)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(CALLS):
            x = x + self.ffn(x)
        return x


def looped(strategy: str = "moe", **options) -> tuple[nn.Module, mc.MoEBlock | mc.MoTBlock]:
    torch.manual_seed(0)
    defaults = {"top_k": 2, "router_options": {"init_std": 0.5}} if strategy == "moe" else {}
    options = {"num_experts": 4, "init": "random", **defaults, **options}
    model = mc.convert(Looped(), strategy=strategy, **options)
    (block,) = sparse_blocks(model).values()
    return model, block


def each_call(model: nn.Module, block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs the model's forward hands ``block``, one per call."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model(x)
    handle.remove()
    return seen


def test_aux_loss_and_stats_add_up_over_the_calls_of_one_forward():
    model, block = looped()
    model.train()
    x = torch.randn(2, 5, 8)
    inputs = each_call(model, block, x)
    assert len(inputs) == CALLS
    alone = []  # each call run on its own: a standalone call keeps its own losses and stats
    for call_input in inputs:
        block(call_input)
        alone.append((block.last_aux_loss.detach(), block.last_stats))
    model(x)
    torch.testing.assert_close(mc.aux_loss(model).detach(), sum(loss for loss, _ in alone))
    stats = mc.stats(model)["ffn"]
    assert stats["tokens"] == CALLS * 10
    assert torch.equal(stats["expert_load"], sum(s["expert_load"] for _, s in alone))
    entropy = sum(s["routing_entropy"] for _, s in alone) / CALLS  # equal token counts
    assert stats["routing_entropy"] == pytest.approx(entropy, rel=1e-6)


def test_every_call_trains_the_router():
    """The gradient of aux_loss reaches the router through every call's losses (it did through the last's)."""
    model, block = looped()
    model.train()
    losses: list[torch.Tensor] = []
    block.router.register_forward_hook(lambda m, args, plan: losses.append(sum(plan.aux_losses.values())))
    model(torch.randn(2, 5, 8))
    assert len(losses) == CALLS
    weight = block.router.gate.weight
    got = torch.autograd.grad(mc.aux_loss(model), weight, retain_graph=True)[0]
    torch.testing.assert_close(got, torch.autograd.grad(sum(losses), weight, retain_graph=True)[0])
    last_only = torch.autograd.grad(losses[-1], weight)[0]
    assert not torch.allclose(got, last_only)


def test_each_forward_starts_afresh_and_a_call_on_its_own_replaces():
    model, block = looped()
    model.train()
    x = torch.randn(2, 5, 8)
    model(x)
    first = mc.aux_loss(model).detach()
    model(x)
    torch.testing.assert_close(mc.aux_loss(model).detach(), first)  # not twice the first
    assert block.called_in_forward is None  # closed after the forward
    for _ in range(2):
        block(x)
    assert block.last_stats["tokens"] == 10  # calls outside the model's forward do not accumulate


def test_mot_statistics_add_up_too():
    model, block = looped("mot", group_size=2, layout="batch_first")
    model(torch.randn(4, 5, 8))
    assert mc.stats(model)["ffn"]["groups"] == CALLS * 2


def test_a_failed_forward_closes_the_scope():
    model, block = looped()
    with pytest.raises(mc.ShapeError):
        model(torch.randn(2, 5, 7))
    assert block.called_in_forward is None


def test_copies_keep_their_own_scope():
    model, _ = looped()
    model.train()
    x = torch.randn(2, 5, 8)
    model(x)
    want = mc.aux_loss(model).detach()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin(x)
        torch.testing.assert_close(mc.aux_loss(twin).detach(), want)
        (twin_block,) = sparse_blocks(twin).values()
        assert twin_block.last_stats["tokens"] == CALLS * 10


def test_token_choice_blocks_take_the_mot_blocks_place_in_the_scope():
    model, _ = looped("mot", group_size=2, num_experts=8, layout="batch_first")
    mc.to_token_choice(model)
    model.train()
    (block,) = sparse_blocks(model).values()
    model(torch.randn(4, 5, 8))
    assert isinstance(block, mc.MoEBlock) and mc.stats(model)["ffn"]["tokens"] == CALLS * 20


def test_compiled_the_scope_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    model, _ = looped()
    model.train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 8)
    compiled(x)
    want = mc.aux_loss(model).detach()
    model(x)
    torch.testing.assert_close(want, mc.aux_loss(model).detach())
    for _ in range(2):
        compiled(torch.randn(2, 5, 8))
    assert counter.frame_count == 1
    assert mc.stats(model)["ffn"]["tokens"] == CALLS * 10


class Outer(nn.Module):
    """A converted submodule called twice by a model converted after it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Looped()
        self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.inner(x)))


def test_a_submodule_converted_first_does_not_reopen_the_scope_inside_the_models_forward():
    torch.manual_seed(0)
    options = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "random"}
    model = Outer()
    mc.convert(model.inner, inplace=True, **options)
    model = mc.convert(model, **options).train()
    assert not model.inner._forward_pre_hooks  # the model's scope covers the submodule's blocks
    model(torch.randn(2, 5, 8))
    assert mc.stats(model)["inner.ffn"]["tokens"] == 2 * CALLS * 10
