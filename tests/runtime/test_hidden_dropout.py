"""Hidden dropout inside the blocks (the dense FFN's dropout between its projections), and kernel choice
around it: a kernel must declare that it applies it; ``auto`` picks one that does for training, a named
one that does not is refused in training with the reason, and eval is unaffected."""

from __future__ import annotations

import pytest
import torch

import mixcompile as mc


def _dense(d=8, h=16):
    torch.manual_seed(0)
    return mc.DenseFFN(
        torch.randn(h, d), torch.randn(d, h), "gelu", b_in=torch.randn(h), b_out=torch.randn(d)
    )


@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_every_hidden_unit_dropped_leaves_the_output_bias(kind):
    """p = 1 drops every hidden activation of every expert: an upcycled MoE returns the dense output bias
    (its weights sum to 1), a MoT block the bias spread back by its emit weights."""
    dense = _dense()
    if kind == "moe":
        block = mc.MoEBlock(8, 16, 4, top_k=2, bias=True, hidden_dropout=1.0, kernel="torch")
    else:
        block = mc.MoTBlock(8, 16, 4, group_size=1, bias=True, hidden_dropout=1.0, kernel="torch",
                            mixer_options={"emit": "experts"})  # fmt: skip
    block.load_dense(dense, init="upcycle")
    x = torch.randn(3, 5, 8)
    block.train()
    torch.testing.assert_close(block(x), dense.b_out.expand(3, 5, 8), rtol=1e-5, atol=1e-5)
    block.eval()
    torch.testing.assert_close(block(x), dense.forward(x), rtol=1e-5, atol=1e-5)


def test_dropout_is_random_in_training_only():
    block = mc.MoEBlock(8, 16, 4, top_k=2, hidden_dropout=0.5, kernel="torch")
    x = torch.randn(2, 5, 8)
    assert not torch.equal(block.train()(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))


class _Fast(mc.Kernel):
    """A high-priority kernel that does not apply hidden dropout."""

    priority = 100

    def supports(self, kind, device, dtype):
        return True

    def moe(self, x, plan, experts):
        return mc.registry().get("kernel", "torch").factory().moe(x, plan, experts)


class _Plugin:
    @mc.hookimpl
    def register_kernels(self, register):
        register("fast", _Fast)


def test_auto_picks_a_kernel_that_applies_dropout_for_training(fresh_registry):
    mc.register_plugin(_Plugin(), name="fast_plugin")
    block = mc.MoEBlock(8, 16, 4, top_k=2, hidden_dropout=0.1)
    assert block.kernel_for("cpu", torch.float32) == "fast"
    assert block.kernel_for("cpu", torch.float32, training=True) == "torch"
    x = torch.randn(2, 3, 8)
    block.eval()(x)
    assert block.last_stats["kernel"] == "fast"
    block.train()(x)
    assert block.last_stats["kernel"] == "torch"
    assert mc.MoEBlock(8, 16, 4, top_k=2).kernel_for("cpu", torch.float32, training=True) == "fast"


def test_a_named_kernel_without_dropout_is_refused_in_training_only(fresh_registry):
    mc.register_plugin(_Plugin(), name="fast_plugin")
    block = mc.MoEBlock(8, 16, 4, top_k=2, hidden_dropout=0.1, kernel="fast", site="model.mlp")
    x = torch.randn(2, 3, 8)
    assert block.eval()(x).shape == x.shape
    with pytest.raises(mc.ConfigError, match=r"at model\.mlp: kernel 'fast' does not apply hidden dropout"):
        block.train()(x)


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.1", float("nan")])
def test_bad_dropout_probability_names_the_argument(p):
    with pytest.raises(mc.ConfigError, match=r"^hidden_dropout must be a finite number >= 0 and <= 1, got"):
        mc.MoEBlock(8, 16, 4, hidden_dropout=p)


def test_blocks_built_from_other_blocks_keep_the_hidden_dropout():
    """to_token_choice (a MoT block becomes a MoE block) and expert parallelism's local slice build new
    experts from a block's: both keep its hidden dropout, and the slice its train / eval mode."""
    from mixcompile.distributed.expert_parallel import _local_slice

    model = torch.nn.Sequential(mc.MoTBlock(8, 16, 4, group_size=2, hidden_dropout=0.25))
    mc.to_token_choice(model)
    assert isinstance(model[0], mc.MoEBlock) and model[0].experts.hidden_dropout == 0.25
    experts = model[0].experts.eval()
    local = _local_slice(experts, 2, 2)
    assert (local.num_experts, local.hidden_dropout, local.training) == (2, 0.25, False)
    torch.testing.assert_close(local.w_in, experts.w_in[2:])
