import pytest
import reference as ref
import torch
import torch.nn.functional as F

import mixcompile as mc


def mot_block(d=6, h=10, experts=3, group=4, **kwargs):
    return mc.MoTBlock(d, h, experts, group_size=group, **kwargs)


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 8, 11])
@pytest.mark.parametrize("emit", ["merge", "experts"])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_loop_reference(batch, emit, gated):
    torch.manual_seed(batch)
    block = mot_block(
        gated=gated, bias=True, mixer_options={"emit": emit, "temperature": 0.7, "init_std": 0.5}
    )
    for mode in (block.train(), block.eval()):
        x = torch.randn(batch, 5, 6)
        expected = ref.mot(x, mode.mixer.controller.weight, mode.experts, 4, temperature=0.7, emit=emit)
        assert ref.rel_err(mode(x), expected) < 1e-5


def test_sequence_first_layout():
    torch.manual_seed(0)
    block = mot_block(layout="seq_first", mixer_options={"init_std": 0.5})
    x = torch.randn(5, 7, 6)  # [T, B, d]
    expected = ref.mot(x.transpose(0, 1), block.mixer.controller.weight, block.experts, 4).transpose(0, 1)
    assert ref.rel_err(block(x), expected) < 1e-5


def test_lone_sequence_gets_weight_one():
    torch.manual_seed(0)
    block = mot_block(mixer_options={"init_std": 1.0})
    x = torch.randn(5, 3, 6)  # groups of 4: the second group has one member
    block(x)
    assert mc.stats(block)[""]["missing_members"] == 3
    x_g = torch.cat([x, x.new_zeros(3, 3, 6)]).reshape(2, 4, 3, 6).permute(2, 0, 1, 3)
    present = (torch.arange(8) < 5).reshape(2, 4)
    plan = block.mixer(x_g, present, sparse=False)
    assert torch.allclose(plan.merge[:, 1, 0], torch.ones(3, 3))  # weight 1, not e^l / (e^l + G - 1)
    assert (plan.merge[:, 1, 1:] == 0).all()
    assert torch.allclose(plan.merge.sum(dim=2), torch.ones(3, 2, 3))
    # and its output is every expert applied to the token itself, summed (emit = merge weight 1)
    lone = x[4]
    expected = sum(ref.expert(block.experts, e, lone) for e in range(3))
    assert ref.rel_err(block(x)[4], expected) < 1e-5


def test_single_sequence_batch():
    block = mot_block()
    x = torch.randn(1, 4, 6)
    expected = sum(ref.expert(block.experts, e, x[0]) for e in range(3))
    assert ref.rel_err(block(x)[0], expected) < 1e-5


def test_upcycle_with_emit_over_experts_is_dense_at_group_size_one():
    d = torch.Generator().manual_seed(3)
    ffn = mc.DenseFFN(
        torch.randn(10, 6, generator=d),
        torch.randn(6, 10, generator=d),
        "silu",
        w_gate=torch.randn(10, 6, generator=d),
    )
    block = mot_block(group=1, gated=True, activation="silu", mixer_options={"emit": "experts"})
    block.load_dense(ffn, init="upcycle")
    x = torch.randn(3, 4, 6)
    assert ref.rel_err(block(x), ref.dense_ffn(x, ffn.w_in, ffn.w_out, "silu", ffn.w_gate)) < 1e-5


def test_split_with_merge_emit_is_dense_at_group_size_one():
    g = torch.Generator().manual_seed(4)
    ffn = mc.DenseFFN(
        torch.randn(12, 6, generator=g),
        torch.randn(6, 12, generator=g),
        "gelu",
        b_in=torch.randn(12, generator=g),
        b_out=torch.randn(6, generator=g),
    )
    block = mot_block(h=4, group=1, bias=True)
    block.load_dense(ffn, init="split")
    x = torch.randn(2, 3, 6)
    assert (
        ref.rel_err(block(x), ref.dense_ffn(x, ffn.w_in, ffn.w_out, "gelu", None, ffn.b_in, None, ffn.b_out))
        < 1e-5
    )


def test_causal_inside_a_causal_model():
    torch.manual_seed(0)

    class TinyCausal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(6, 18)
            self.ffn = mot_block(group=3, mixer_options={"init_std": 1.0})

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.ffn(x)

    model = TinyCausal()
    for batch in (3, 5, 7):
        x = torch.randn(batch, 9, 6)
        base = model(x)
        for s in range(batch):
            for t in (0, 4, 8):
                changed = x.clone()
                changed[s, t:] = torch.randn(9 - t, 6) * 5
                out = model(changed)
                assert torch.equal(out[:, :t], base[:, :t]), (batch, s, t)
                assert not torch.allclose(out[s, t:], base[s, t:])


def test_sparse_mode_keeps_each_experts_top_member():
    torch.manual_seed(0)
    block = mot_block(mode="sparse", mixer_options={"init_std": 1.0})
    x = torch.randn(4, 2, 6)
    y = block(x)
    logits = x.double() @ ref.f64(block.mixer.controller.weight).t()  # [B, T, E]
    expected = torch.zeros_like(x, dtype=torch.float64)
    for t in range(2):
        for e in range(3):
            top = int(logits[:, t, e].argmax())
            expected[top, t] += ref.expert(block.experts, e, x[top, t : t + 1])[0]
    assert ref.rel_err(y, expected) < 1e-5
    assert mc.stats(block)[""]["sparse"] is True


def test_small_batch_policy_applies_in_eval_only():
    torch.manual_seed(0)
    block = mot_block(small_batch="sparse", mixer_options={"init_std": 1.0})
    x = torch.randn(2, 3, 6)
    block.eval()
    block(x)
    assert mc.stats(block)[""]["sparse"] is True
    block(torch.randn(4, 3, 6))  # a full group: soft
    assert mc.stats(block)[""]["sparse"] is False
    block.train()
    block(x)
    assert mc.stats(block)[""]["sparse"] is False
    grouped = mot_block(small_batch="group")
    grouped.eval()
    grouped(x)
    assert mc.stats(grouped)[""]["sparse"] is False


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = mot_block(gated=True, bias=True)
    x = torch.randn(7, 3, 6, requires_grad=True)
    block(x).square().sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_flop_matched_hidden():
    assert mc.flop_matched_hidden("mot", 1024, num_experts=32, group_size=16) == 512
    assert mc.flop_matched_hidden("moe", 1024, num_experts=8, top_k=2) == 512
    with pytest.raises(mc.ConfigError, match="not an integer"):
        mc.flop_matched_hidden("mot", 100, num_experts=3, group_size=1)
    with pytest.raises(mc.ConfigError, match="strategy must be 'moe' or 'mot'"):
        mc.flop_matched_hidden("dense", 100, num_experts=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group": 0}, "group_size must be >= 1"),
        ({"experts": 0}, "num_experts must be >= 1"),
        ({"mixer": "softmx"}, "unknown mixer 'softmx'. Did you mean 'softmax'"),
        ({"mixer_options": {"temperature": 0}}, "temperature must be a finite number >= 1e-06"),
        ({"mixer_options": {"emit": "tokens"}}, "unknown emit 'tokens'"),
        ({"mode": "hard"}, "unknown mode 'hard'"),
        ({"small_batch": "pad"}, "unknown small_batch 'pad'"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, match):
    with pytest.raises(mc.ConfigError, match=match):
        mot_block(**kwargs)


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 5), (1, 2, 3, 6)])
def test_bad_input_shape(shape):
    with pytest.raises(mc.ShapeError, match=r"MoTBlock expects inputs of shape \[B, T, d\] .* d=6"):
        mot_block()(torch.randn(*shape))


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_an_empty_batch_gives_an_empty_output_and_gradient(layout):
    """No sequences (or none yet, as a data loader's last partial step may give): an empty output of the
    input's shape, like an nn.Linear's, not a reshape error from inside the block."""
    block = mc.MoTBlock(8, 16, 4, group_size=2, layout=layout)
    x = torch.randn((0, 5, 8) if layout == "batch_first" else (5, 0, 8), requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
    assert block.last_stats["groups"] == 0


def test_mode_and_small_batch_are_checked_when_set():
    """Transition tuning sets them on trained blocks: a misspelt value would run as soft and be saved."""
    block = mot_block()
    # UnknownNameError, as the same typo through convert is (a ConfigError, with the closest value)
    with pytest.raises(mc.UnknownNameError, match="unknown mode 'Sparse'. Did you mean 'sparse'"):
        block.mode = "Sparse"
    with pytest.raises(mc.UnknownNameError, match="unknown small_batch 'grp'. Did you mean 'group'"):
        block.small_batch = "grp"
    assert (block.mode, block.small_batch) == ("soft", "group")
    block.mode, block.small_batch = "sparse", "sparse"
    assert block.settings()["mode"] == "sparse" and block.settings()["small_batch"] == "sparse"


@pytest.mark.parametrize("emit", ["merge", "experts"])
def test_a_float64_block_passes_gradcheck(emit):
    """The mixing weights are computed in the block's dtype when it is wider than float32: a float64 block
    (gradcheck, a reference run) must not round them to float32."""
    torch.manual_seed(0)
    block = mot_block(kernel="torch", gated=True, mixer_options={"emit": emit, "init_std": 0.5}).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def _graph_nodes(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``output``."""
    seen, stack, names = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_full_batch_step_records_no_pass_it_does_not_need(temperature):
    """Whole groups take no slice of the output (a slice's backward zero-fills a gradient of the whole
    output and copies into it: two passes over activations), and temperature 1 no division; an incomplete
    group and another temperature still take theirs."""
    block = mot_block(mixer_options={"temperature": temperature})
    full = _graph_nodes(block(torch.randn(8, 5, 6, requires_grad=True)))
    assert "SliceBackward0" not in full
    assert ("DivBackward0" in full) == (temperature != 1.0)
    assert "SliceBackward0" in _graph_nodes(block(torch.randn(7, 5, 6, requires_grad=True)))
