"""Activation (gradient) checkpointing: the layers it recomputes in backward give the gradients of a plain
backward. Two things could break that: the signal non-reentrant checkpointing raises through a block to stop
recomputing (it must not be reported as a plugin's crash), and the MoT blocks' padding mask and batch size,
which the model's forward hands them and which are gone when backward recomputes a layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import VOCAB, build

import mixcompile as mc
from mixcompile.runtime.blocks import MoTBlock


def _block(strategy: str) -> nn.Module:
    torch.manual_seed(0)
    if strategy == "mot":
        return MoTBlock(8, 16, 4, group_size=2, kernel="torch", mixer_options={"init_std": 0.5})
    return mc.MoEBlock(8, 16, 4, top_k=2, kernel="torch")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("strategy", ["moe", "mot"])
def test_a_checkpointed_block_gives_the_plain_gradients(strategy, reentrant) -> None:
    block, linear = _block(strategy), nn.Linear(8, 8)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return block(linear(x)) + x  # the block last, as in GPT-2 and LLaMA layers: recomputing stops in it

    x = torch.randn(4, 3, 8, requires_grad=True)
    params = [x, *block.parameters(), *linear.parameters()]

    def grads(run) -> list[torch.Tensor]:  # reentrant checkpointing takes .backward(), not autograd.grad
        for p in params:
            p.grad = None
        run(layer, x).square().sum().backward()
        return [p.grad for p in params]

    expected = grads(lambda f, x: f(x))
    got = grads(lambda f, x: checkpoint(f, x, use_reentrant=reentrant))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _checkpointing(model: nn.Module, enabled: bool, reentrant: bool) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing."""
    if not enabled:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _mot_model(name: str) -> nn.Module:
    """The zoo model ``name`` converted to MoT, training, without dropout (the same masks in both runs)."""
    torch.manual_seed(0)
    model = mc.convert(
        build(name),
        strategy="mot",
        num_experts=4,
        group_size=4,
        init="random",
        mixer_options={"init_std": 0.5},
    ).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batch(seed: int, padded: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 8), generator=generator)
    mask = torch.ones(4, 8, dtype=torch.long)
    for row, start in padded:
        mask[row, start:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    "name", ["gpt2", "opt"]
)  # OPT's blocks see flattened tokens: they need the batch size
def test_checkpointed_mot_layers_keep_the_padding_mask(name, reentrant) -> None:
    """Two padded forwards, then one backward: each recomputed layer mixes as its own forward did."""
    pytest.importorskip("transformers")
    model = _mot_model(name)
    first, second = _batch(1, [(1, 5)]), _batch(2, [(0, 6), (2, 3)])

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        _checkpointing(model, enabled, reentrant)
        model.zero_grad()
        (model(**first).loss + 0.5 * model(**second).loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)
    assert all(
        b.recompute_context is None and not b.token_context
        for b in model.modules()
        if isinstance(b, MoTBlock)
    )


def test_router_losses_train_under_non_reentrant_checkpointing_and_reentrant_is_refused() -> None:
    """Reentrant checkpointing runs the forward without autograd, so the router losses the blocks keep
    would carry no gradient: ``aux_loss`` says so instead of returning a constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), mc.MoEBlock(8, 16, 4, top_k=2, kernel="torch"))
    x = torch.randn(6, 8, requires_grad=True)

    def router_grad(run) -> torch.Tensor:
        model.zero_grad()
        (run(x).sum() + mc.aux_loss(model)).backward()
        return model[1].router.gate.weight.grad.clone()

    plain = router_grad(model)
    torch.testing.assert_close(router_grad(lambda x: checkpoint(model, x, use_reentrant=False)), plain)
    checkpoint(model, x, use_reentrant=True)
    with pytest.raises(
        mc.ConfigError, match=r"router losses of the MoE block at '1' have no gradient.*reentrant"
    ):
        mc.aux_loss(model)
    with torch.no_grad():  # for logging, the value is there
        assert torch.isfinite(mc.aux_loss(model))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.mlp = MoTBlock(8, 16, 4, group_size=2, kernel="torch", mixer_options={"init_std": 0.5})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.lin(x))


class _Net(nn.Module):
    """A hand-written model whose layers are checkpointed; the mask comes from mixcompile.token_mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if self.reentrant is None else checkpoint(layer, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_token_mask_gives_checkpointed_layers_their_mask_in_backward(reentrant) -> None:
    net, x = _Net(), torch.randn(4, 5, 8, requires_grad=True)  # reentrant checkpointing needs one
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:], mask[2, 1:] = False, False

    def grads(mode: bool | None) -> list[torch.Tensor]:
        net.reentrant = mode
        net.zero_grad()
        with mc.token_mask(net, mask):
            y = net(x)
        (y * mask[..., None]).square().sum().backward()  # backward after the body, as usual
        return [p.grad.clone() for p in net.parameters()]

    for got, want in zip(grads(reentrant), grads(None), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_recomputation_that_lost_its_mask_is_refused_not_miscomputed() -> None:
    """A loss from a tensor backward reaches through no output of the masked model (here one a forward
    hook captured): nothing can give the recomputed block its mask back, so it says so."""
    net, x = _Net(), torch.randn(4, 5, 8)
    net.reentrant = False
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    captured = []
    net.layers[0].register_forward_hook(lambda m, a, out: captured.append(out))
    with mc.token_mask(net, mask):
        net(x)
    with pytest.raises(mc.ShapeError, match=r"recomputed in backward \(activation checkpointing\) without"):
        captured[0].sum().backward()


def test_a_loss_on_an_inner_hidden_state_keeps_the_padding_mask() -> None:
    """ModelOutput.hidden_states is a tuple inside the output: its tensors bring the context back too."""
    pytest.importorskip("transformers")
    model = _mot_model("gpt2")
    batch = _batch(1, [(1, 5)])
    del batch["labels"]

    def grads(enabled: bool) -> list[torch.Tensor]:
        _checkpointing(model, enabled, reentrant=True)
        model.zero_grad()
        model(**batch, output_hidden_states=True).hidden_states[1].square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_bias_balancing_counts_each_token_once_under_checkpointing(reentrant) -> None:
    """The recomputation in backward ran in training mode and counted every token again: the load buffer,
    saved in checkpoints and read as each rank's load, held twice the tokens routed."""
    torch.manual_seed(0)
    block = mc.MoEBlock(8, 16, 4, top_k=2, router_options={"bias_balancing": True})
    x = torch.randn(16, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=reentrant).square().sum().backward()
    counted = block.router.load_since_update
    assert counted.sum().item() == 16 * 2
    block.router.load_since_update.zero_()
    block(x)
    torch.testing.assert_close(block.router.load_since_update, counted, rtol=0, atol=0)
