"""A converted MoT model compiled with ``torch.compile`` (default options) compiles what the dense model
does over a run of batch sizes, a static graph and then a dynamic one, with and without a padding mask, and
computes what eager does.

The hooks on the compiled module itself run outside the compiled frame, so what they record for the blocks
is read there as an input: a batch size recorded as a number was a constant the compiled forward guarded on
(a recompilation for every new batch size), and an operation in a hook compiled a graph of its own.
``torch._dynamo.testing`` imports ``triton``, so it is imported only inside tests (see ``test_compile.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import build

import mixcompile as mc
from mixcompile import build_tiny_gpt

BATCHES = (4, 6, 8, 10)  # the first compiles a static graph, the second a dynamic one; the others none
DENSE_GRAPHS = 2  # what each dense model here compiles over BATCHES (torch 2.13, transformers 5)
MOT = {"strategy": "mot", "num_experts": 4, "group_size": 2, "kernel": "torch"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_gpt(vocab_size=100, n_layer=2, d_ff=128) if name == "tiny_gpt" else build(name)


def _call(model: torch.nn.Module, name: str, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The logits; a Hugging Face model takes the mask as its ``attention_mask``, the tiny GPT (no mask
    argument) from ``mixcompile.token_mask`` around the call."""
    if name != "tiny_gpt":
        return model(input_ids=ids, attention_mask=mask).logits
    if mask is None:
        return model(ids)
    with mc.token_mask(getattr(model, "_orig_mod", model), mask):
        return model(ids)


def _graphs(
    model: torch.nn.Module, name: str, padded: bool, batches: tuple[int, ...] = BATCHES, limit: int = 2
) -> int:
    """How many graphs ``torch.compile(model)`` compiles over ``batches``, forward and backward; each
    output and gradient equals an eager copy's. A function compiled more than ``limit`` times (a graph, or
    a hook's frame that has none) is an error."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        ids = torch.randint(3, 100, (batch, 6), generator=generator)
        mask = None
        if padded:  # a sequence padded on the right, one on the left
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0
            mask[batch - 1, :3] = 0
        results = []
        for module in (compiled, eager):
            base = getattr(module, "_orig_mod", module)
            base.zero_grad()
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                logits = _call(module, name, ids, mask)
            logits.square().mean().backward()
            results.append((logits.detach(), [p.grad for p in base.parameters()]))
        (got, got_grads), (want, want_grads) = results
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    return counter.frame_count


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "tiny_gpt"])
def test_a_compiled_mot_model_compiles_what_the_dense_one_does(name, padded):
    """OPT's FFN sees flattened [B*T, d] tokens: its blocks take the batch size from the model's forward."""
    assert _graphs(mc.convert(_model(name), **MOT).train(), name, padded) <= DENSE_GRAPHS


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
def test_incomplete_groups_compile_no_graph_of_their_own(padded):
    """Batch sizes that leave the last group short (by one member, by several, by none) compile what the
    dense model does: whether members were missing, and whether exactly one, were guards (five graphs
    over these batches where the dense model compiles two). A batch of one group (B <= G) is still one
    graph more: the mixer's product over a groups dimension of size 1 (README, Kernels)."""
    mot = {**MOT, "group_size": 4}
    ragged = (8, 6, 5, 7, 12, 9, 16, 13)  # full groups again after short ones (12, 16)
    assert _graphs(mc.convert(_model("tiny_gpt"), **mot).train(), "tiny_gpt", padded, ragged) <= DENSE_GRAPHS
    torch._dynamo.reset()
    one_group = (8, 6, 5, 3, 7, 2)
    assert _graphs(_model("tiny_gpt").train(), "tiny_gpt", padded, one_group, limit=3) == DENSE_GRAPHS
    torch._dynamo.reset()
    model = mc.convert(_model("tiny_gpt"), **mot).train()
    assert _graphs(model, "tiny_gpt", padded, one_group, limit=3) == DENSE_GRAPHS + 1


@pytest.mark.parametrize("padded", [False, True], ids=["batch_only", "padded"])
def test_a_flat_block_takes_its_batch_size_from_token_mask_as_a_symbolic_size(padded):
    """``token_mask(block, None, batch=B)`` around a compiled ``[B*T, d]`` block: one static graph, one
    dynamic one, then none for later batch sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    block = mc.MoTBlock(16, 32, 4, group_size=2, layout="flat", kernel="torch")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter)
    for batch in BATCHES:
        x = torch.randn(batch * 5, 16)
        mask = torch.ones(batch, 5, dtype=torch.bool)
        mask[1, 3:] = False
        results = []
        for module in (compiled, block):
            with mc.token_mask(block, mask if padded else None, batch=batch):
                results.append(module(x))
        torch.testing.assert_close(*results, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2


class _Checkpointed(nn.Module):
    """A layer checkpointed in its forward; a MoT block keeps statistics (a side effect) in it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.mot = mc.MoTBlock(8, 16, 4, group_size=2, kernel="torch", mixer_options={"init_std": 0.5})

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mot(self.lin(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.layer, x, use_reentrant=False)


def test_compiled_checkpointing_names_the_setting_that_recomputes_in_the_compiled_backward():
    """torch.compile cannot trace a checkpoint with side effects: it runs that layer eagerly, so backward
    recomputes it without the padding mask, which is refused naming the setting; with the setting the
    compiled backward recomputes it, and the gradients are eager's."""
    net, x = _Checkpointed(), torch.randn(4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:], mask[2, 1:] = False, False

    def grads(module: nn.Module, padding: torch.Tensor | None = mask) -> list[torch.Tensor]:
        net.zero_grad()
        with mc.token_mask(net, padding, batch=4):
            y = module(x)
        (y * mask[..., None]).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    want = grads(net)
    unmasked = grads(net, None)
    assert any(not torch.allclose(g, w) for g, w in zip(unmasked, want, strict=True))  # the mask matters
    with pytest.raises(mc.ShapeError, match="skip_fwd_side_effects_in_bwd_under_checkpoint = True"):
        grads(torch.compile(net, backend="aot_eager"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        got = grads(torch.compile(net, backend="aot_eager"))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
