import copy
import math
import re
import warnings

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixcompile as mc
from mixcompile.runtime.checks import check_routing_plan
from mixcompile.runtime.kernels import get_kernel
from mixcompile_plugins.routers import TopKRouter

TORCH = get_kernel("torch")  # routers run their top-k step through the block's kernel

ROUTERS = ["topk", "switch", "expert_choice", "hash"]


def dense(d=12, h=20, gated=False, bias=False, act="gelu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return mc.DenseFFN(
        w_in=r(h, d),
        w_out=r(d, h),
        activation=act,
        w_gate=r(h, d) if gated else None,
        b_in=r(h) if bias else None,
        b_gate=r(h) if bias and gated else None,
        b_out=r(d) if bias else None,
    )


def dense_ref(x, ffn):
    return ref.dense_ffn(x, ffn.w_in, ffn.w_out, ffn.activation, ffn.w_gate, ffn.b_in, ffn.b_gate, ffn.b_out)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["gelu", "silu", "relu", "gelu_tanh"])
@pytest.mark.parametrize(
    "router,options",
    [
        ("topk", {}),
        ("topk", {"order": "topk_softmax"}),
        ("hash", {}),
        ("topk", {"bias_balancing": True}),
    ],
)
def test_upcycle_equals_dense(gated, bias, act, router, options):
    ffn = dense(gated=gated, bias=bias, act=act)
    block = mc.MoEBlock(
        12, 20, 4, top_k=2, activation=act, gated=gated, bias=bias, router=router, router_options=options
    )
    block.load_dense(ffn, init="upcycle")
    x = torch.randn(3, 7, 12)
    assert ref.rel_err(block(x), dense_ref(x, ffn)) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("method", ["random", "balanced"])
def test_split_with_all_experts_equals_dense(gated, method):
    ffn = dense(h=24, gated=gated, bias=True)
    experts = 4
    # A zero router gives every expert weight 1/E; scale=E compensates, so the sum of all experts is dense.
    block = mc.MoEBlock(12, 6, experts, top_k=experts, gated=gated, bias=True, router_options={"init_std": 0})
    generator = torch.Generator().manual_seed(1)
    block.load_dense(ffn, init="split", method=method, scale=experts, generator=generator)
    x = torch.randn(10, 12)
    assert ref.rel_err(block(x), dense_ref(x, ffn)) < 1e-5


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gated", [False, True])
def test_block_matches_per_pair_reference(router, gated):
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    block = mc.MoEBlock(8, 16, 5, top_k=top_k, gated=gated, bias=True, router=router)
    x = torch.randn(2, 9, 8)
    y = block(x)
    plan = block.router(x.reshape(-1, 8), TORCH)
    assert ref.rel_err(y.reshape(-1, 8), ref.moe_from_plan(x.reshape(-1, 8), plan, block.experts)) < 1e-5


def test_shared_experts_are_added_with_weight_one():
    torch.manual_seed(0)
    block = mc.MoEBlock(8, 16, 4, top_k=2, num_shared_experts=2)
    x = torch.randn(11, 8)
    plan = block.router(x, TORCH)
    expected = ref.moe_from_plan(x, plan, block.experts)
    expected += ref.expert(block.shared_experts, 0, x) + ref.expert(block.shared_experts, 1, x)
    assert ref.rel_err(block(x), expected) < 1e-5


@settings(max_examples=40, deadline=None)
@given(
    router=st.sampled_from(ROUTERS),
    tokens=st.integers(1, 40),
    experts=st.integers(1, 9),
    k_frac=st.floats(0, 1),
    capacity=st.one_of(st.none(), st.floats(0.1, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_router_plans_are_valid(router, tokens, experts, k_frac, capacity, seed):
    torch.manual_seed(seed)
    top_k = 1 if router == "switch" else 1 + int(k_frac * (experts - 1))
    if router == "expert_choice" and capacity is None:
        capacity = 1.0
    r = mc.registry().get("router", router).factory(6, experts, top_k, capacity_factor=capacity)
    x = torch.randn(tokens, 6)
    plan = r(x, TORCH)
    with mc.debug_checks():  # no pair twice, indices valid
        check_routing_plan(plan, source=router, num_tokens=tokens, num_experts=experts)
    assert (plan.weight >= 0).all() and (plan.weight <= 1 + 1e-6).all()
    load = torch.bincount(plan.expert_index, minlength=experts)
    if capacity is not None:
        cap = math.ceil(capacity * tokens * top_k / experts)
        assert (load <= cap).all()
    if router == "expert_choice":
        assert (load == min(tokens, math.ceil(capacity * tokens * top_k / experts))).all()
        assert plan.pairs_per_token is None  # expert by expert, not token by token
        return
    per_token = torch.bincount(plan.token_index, minlength=tokens)
    assert (per_token <= top_k).all()
    assert int(per_token.sum()) + plan.dropped_assignments == tokens * top_k
    # dropless plans declare their token-by-token order (checked above), so kernels skip a sort
    assert plan.pairs_per_token == (top_k if capacity is None else None)
    if capacity is None:
        assert (per_token == top_k).all()
        sums = torch.zeros(tokens).index_add(0, plan.token_index, plan.weight)
        if router == "switch":
            assert torch.allclose(plan.weight, plan.probs.max(-1).values)
        else:
            assert torch.allclose(sums, torch.ones(tokens), atol=1e-6)


def test_capacity_drops_the_lowest_weighted_tokens():
    router = mc.registry().get("router", "switch").factory(2, 2, 1, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Every token prefers expert 0; capacity = ceil(1 * 4 * 1 / 2) = 2 keeps the two most confident.
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    plan = router(x, TORCH)
    assert sorted(plan.token_index.tolist()) == [1, 2]
    assert plan.expert_index.tolist() == [0, 0]
    assert plan.dropped_assignments == 2


def test_topk_orders_hand_computed():
    logits = [2.0, 1.0, 0.0, -1.0]
    x = torch.eye(4)[:1]  # one token whose logits are the gate's first column
    top2 = math.exp(2) + math.exp(1)
    # Both orders renormalise over the two kept experts, so they agree on this case.
    for order, expected in (
        ("softmax_topk", [math.exp(2) / top2, math.exp(1) / top2]),
        ("topk_softmax", [math.exp(2) / top2, math.exp(1) / top2]),
    ):
        r = mc.registry().get("router", "topk").factory(4, 4, 2, order=order)
        with torch.no_grad():
            r.gate.weight.copy_(torch.tensor([logits, [0.0] * 4, [0.0] * 4, [0.0] * 4]).t())
        plan = r(x, TORCH)
        assert plan.expert_index.tolist() == [0, 1]
        assert plan.weight.tolist() == pytest.approx(expected, rel=1e-6)
    raw = mc.registry().get("router", "topk").factory(4, 4, 2, renormalize=False)
    with torch.no_grad():
        raw.gate.weight.copy_(torch.tensor([logits, [0.0] * 4, [0.0] * 4, [0.0] * 4]).t())
    z = sum(math.exp(v) for v in logits)
    assert raw(x, TORCH).weight.tolist() == pytest.approx([math.exp(2) / z, math.exp(1) / z], rel=1e-6)


def test_aux_losses_equal_their_formulas():
    block = mc.MoEBlock(
        2, 4, 2, top_k=1, router="switch", router_options={"balance_loss_weight": 0.5, "z_loss_weight": 0.25}
    )
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # logits = x: experts 0, 0, 1
    block(x)
    p = [
        [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]
        for a, b in x.tolist()
    ]
    mean_p = [sum(row[i] for row in p) / 3 for i in range(2)]
    f = [2 / 3, 1 / 3]
    balance = 2 * (f[0] * mean_p[0] + f[1] * mean_p[1])
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in x.tolist()) / 3
    assert mc.aux_loss(block).item() == pytest.approx(0.5 * balance + 0.25 * z, rel=1e-6)
    stats = mc.stats(block)[""]
    assert stats["expert_load"].tolist() == [2, 1]
    assert stats["dropped_tokens"] == 0
    entropy = -sum(q * math.log(q) for row in p for q in row) / 3
    assert stats["routing_entropy"] == pytest.approx(entropy, rel=1e-5)


def test_router_losses_only_in_training_mode_stats_in_both():
    """An eval forward (generation, validation) computes no router losses, which no backward would use;
    its statistics are still there, and the same as a training forward's."""
    block = mc.MoEBlock(8, 16, 4, top_k=2, router_options={"balance_loss_weight": 0.5, "z_loss_weight": 0.1})
    x = torch.randn(5, 8)
    block.train()
    block(x)
    trained = mc.stats(block)[""]
    assert block.last_aux_loss is not None and mc.aux_loss(block).item() > 0
    block.eval()
    with torch.no_grad():
        block(x)
    assert block.last_aux_loss is None and mc.aux_loss(block).item() == 0.0
    evaluated = mc.stats(block)[""]
    assert evaluated["expert_load"].tolist() == trained["expert_load"].tolist()
    assert evaluated["expert_load"].sum().item() == 10 and evaluated["dropped_tokens"] == 0
    assert evaluated["routing_entropy"] == pytest.approx(trained["routing_entropy"], rel=1e-6)


def test_bias_balancing_moves_selection_not_weights():
    block = mc.MoEBlock(2, 4, 2, top_k=1, router_options={"bias_balancing": True, "bias_update_rate": 0.5})
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]] * 4)  # all prefer expert 0 by logit 1 vs 0
    block.train()
    block(x)
    assert block.router(x, TORCH).expert_index.tolist() == [0, 0, 0, 0]
    assert mc.update_routing_bias(block) == 1
    assert block.router.selection_bias.tolist() == [-0.5, 0.5]
    plan = block.router(x, TORCH)  # selection scores 0.73-0.5 < 0.27+0.5: the bias now selects expert 1
    assert plan.expert_index.tolist() == [1, 1, 1, 1]
    assert plan.weight.tolist() == pytest.approx([1.0] * 4)  # top-1 renormalised, the bias is not in it
    block(x)
    assert block.router.selection_bias.tolist() == [-0.5, 0.5]  # no update without the call
    mc.update_routing_bias(block)  # now expert 1 was over-loaded: the bias swings back
    assert block.router.selection_bias.tolist() == [0.0, 0.0]


def test_bias_balancing_state_keeps_its_precision_when_the_model_is_cast():
    """``model.to(torch.bfloat16)`` cast the counters and the bias too: loads past 256 lost units (1173
    counted as 1176, flipping sign(mean - load)), and a bias at 0.5 no longer moved by 1e-3 steps."""
    block = mc.MoEBlock(8, 16, 4, top_k=2, router_options={"bias_balancing": True})
    router = block.router
    router.selection_bias.fill_(0.5)
    router.load_since_update.copy_(torch.tensor([1173.0, 1211.0, 1211.0, 1205.0]))
    block.to(torch.bfloat16)
    assert block.experts.w_in.dtype == torch.bfloat16
    assert router.selection_bias.dtype == router.load_since_update.dtype == torch.float32
    assert router.load_since_update.tolist() == [1173.0, 1211.0, 1211.0, 1205.0]
    mc.update_routing_bias(block)
    assert router.selection_bias.tolist() == pytest.approx([0.501, 0.499, 0.499, 0.499], abs=1e-7)
    block.double()  # wider casts apply (a float64 block computes its routing in float64)
    assert router.selection_bias.dtype == torch.float64


def test_the_torch_kernel_gives_the_same_gradients_every_time():
    """With two CPU threads the expert bias's gradient (``bias[expert]``: an accumulating index put in
    backward) differed between identical backward passes, so same-seed runs and resumed runs diverged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        block = mc.MoEBlock(32, 64, 4, top_k=2, bias=True, kernel="torch")
        with torch.no_grad():
            for p in block.experts.parameters():
                p.normal_(0, 0.1)
        x = torch.randn(1024, 32, requires_grad=True)
        grads = []
        for _ in range(30):  # the race showed in most repeats, not all
            block.zero_grad(set_to_none=True)
            x.grad = None
            block(x).square().sum().backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in block.parameters())])
    finally:
        torch.set_num_threads(threads)
    for again in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(again, grads[0], strict=True))


def test_jitter_only_in_training():
    torch.manual_seed(0)
    block = mc.MoEBlock(8, 8, 4, top_k=1, router_options={"jitter": 0.5})
    x = torch.randn(64, 8)
    block.eval()
    assert torch.equal(block.router.logits(x), block.router.logits(x))
    block.train()
    assert not torch.equal(block.router.logits(x), block.router.logits(x))


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
def test_gradients_reach_every_parameter(router):
    torch.manual_seed(0)
    block = mc.MoEBlock(
        8,
        16,
        4,
        top_k=1 if router == "switch" else 2,
        gated=True,
        bias=True,
        router=router,
        num_shared_experts=1,
    )
    x = torch.randn(4, 6, 8, requires_grad=True)
    (block(x).square().sum() + mc.aux_loss(block)).backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_capacity_stats_count_dropped_tokens():
    block = mc.MoEBlock(4, 8, 2, top_k=1, router_options={"capacity_factor": 0.5, "init_std": 0})
    block(torch.randn(8, 4))  # zero router: all pick expert 0 (ties by index); capacity 2
    stats = mc.stats(block)[""]
    assert stats["expert_load"].tolist() == [2, 0]
    assert stats["dropped_tokens"] == 6 and stats["dropped_assignments"] == 6


def test_kernel_auto_resolves_to_torch_on_cpu():
    block = mc.MoEBlock(4, 8, 2, top_k=1)
    assert block.kernel_for("cpu", torch.float32) == "torch"
    block(torch.randn(3, 4))
    assert mc.stats(block)[""]["kernel"] == "torch"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"top_k": 5}, r"top_k=5 is more than num_experts=4: top_k must be <= num_experts"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"router": "top_k"}, "unknown router 'top_k'. Did you mean 'topk'"),
        ({"kernel": "trition"}, "unknown kernel 'trition'"),
        ({"activation": "gleu"}, "unknown activation 'gleu'. Did you mean 'gelu'"),
        ({"router_options": {"capacity": 1.0}}, "router 'topk' .* rejected its options"),
        ({"router_options": {"capacity_factor": -1}}, "capacity_factor must be a finite number > 0"),
        ({"router_options": {"capacity_factor": float("inf")}}, "capacity_factor must be a finite number"),
        ({"router": "expert_choice", "router_options": {"capacity_factor": float("inf")}}, "capacity_factor"),
        ({"router": "switch", "top_k": 2}, "top_k must be 1"),
        ({"num_shared_experts": -1}, "num_shared_experts must be >= 0"),
        ({"router_options": {"jitter": 1.0}}, "jitter must be a finite number >= 0 and < 1, got 1.0"),
        ({"router_options": {"jitter": float("nan")}}, "jitter must be a finite number >= 0 and < 1"),
        ({"router": "hash", "router_options": {"seed": "3"}}, "seed must be an integer, got '3'"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, match):
    args = {"d_model": 4, "d_hidden": 8, "num_experts": 4, **kwargs}
    with pytest.raises(mc.ConfigError, match=match):
        mc.MoEBlock(**args)


@pytest.mark.parametrize(
    ("router", "option"),
    [
        ("topk", "renormalize"),
        ("topk", "bias_balancing"),
        ("switch", "bias_balancing"),
        ("expert_choice", "bias_balancing"),
    ],
)
@pytest.mark.parametrize("value", ["false", "False", "true", 0, 1, None])
def test_on_off_router_options_must_be_bools(router, option, value):
    """A string such as "false" (--router-option renormalize=False) is truthy: it turned the option on."""
    with pytest.raises(
        mc.ConfigError, match=rf"{option} must be True or False, got {re.escape(repr(value))}"
    ):
        mc.MoEBlock(4, 8, 4, top_k=1, router=router, router_options={option: value})


def test_bias_update_rate_is_refused_without_bias_balancing():
    """It did nothing without bias_balancing=True, silently; the default still applies with it."""
    for options in ({"bias_update_rate": 0.5}, {"bias_update_rate": 0.5, "bias_balancing": False}):
        with pytest.raises(
            mc.ConfigError, match=r"bias_update_rate=0.5 only applies with bias_balancing=True"
        ):
            mc.MoEBlock(4, 8, 4, router_options=options)
    assert mc.MoEBlock(4, 8, 4, router_options={"bias_balancing": True}).router.bias_update_rate == 1e-3
    assert mc.MoEBlock(4, 8, 4).router.bias_update_rate == 1e-3
    # expert choice has no balancing bias: its refusal does not point at bias_balancing=True
    with pytest.raises(mc.ConfigError, match="balanced by construction; bias_balancing and bias_update_rate"):
        mc.MoEBlock(4, 8, 4, router="expert_choice", router_options={"bias_update_rate": 0.5})


def test_token_ids_are_refused_as_what_they_are():
    """Integer input is not a dtype to cast the block to: the hint says to embed the tokens."""
    with pytest.raises(mc.ShapeError, match="got a torch.int64 input.*not on token ids: embed the tokens"):
        mc.MoEBlock(4, 8, 2, top_k=2)(torch.randint(0, 9, (3, 4)))


@pytest.mark.parametrize("order", ["softmax_topk", "topk_softmax"])
def test_a_top1_router_whose_weight_is_always_one_says_so_in_training(order):
    """Its gate gets no gradient from the task loss (weight p/p = 1): a training forward warns, naming the
    two ways out; building it (a saved model loaded) and inference do not."""
    x = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block = mc.MoEBlock(4, 8, 2, top_k=1, router_options={"order": order})
        block.eval()(x)
    no_gradient = "top_k=1 .* weight 1: the task loss sends its gate no gradient"
    with pytest.warns(UserWarning, match=no_gradient) as said:
        y = block.train()(x)
    assert [w.filename for w in said] == [__file__]  # the line calling the block, not torch's module.py
    (grad,) = torch.autograd.grad(y.square().sum(), block.router.gate.weight, allow_unused=True)
    assert grad is None or grad.abs().max() < 1e-6  # p / p: rounding only
    for options in ({"router": "switch"}, {"router_options": {"renormalize": False}}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            block = mc.MoEBlock(4, 8, 2, top_k=1, **options)
            (grad,) = torch.autograd.grad(block(x).square().sum(), block.router.gate.weight)
        assert grad.abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 5)])
def test_bad_input_shape_names_the_block(shape):
    block = mc.MoEBlock(4, 8, 2, top_k=1)
    with pytest.raises(mc.ShapeError, match=r"MoEBlock expects inputs of shape \[..., d\] with d=4"):
        block(torch.randn(*shape))


def test_load_dense_checks_fit_and_initializer_names():
    block = mc.MoEBlock(12, 20, 4)
    with pytest.raises(mc.ConfigError, match="gated=True vs the block's gated=False"):
        block.load_dense(dense(gated=True))
    with pytest.raises(mc.ConfigError, match="unknown initializer 'upcycel'. Did you mean 'upcycle'"):
        block.load_dense(dense(), init="upcycel")
    with pytest.raises(mc.ConfigError, match="hidden size must be 20 / 4"):
        block.load_dense(dense(), init="split")


@pytest.mark.parametrize(("d_hidden", "hint"), [(5, "init='split' or init='random'"), (10, "init='random'")])
def test_upcycle_into_experts_of_another_size_suggests_an_initializer_that_fits(d_hidden, hint):
    """It said init='split' whatever the size, which then failed too unless the size was h / num_experts."""
    block = mc.MoEBlock(12, d_hidden, 4)
    with pytest.raises(
        mc.ConfigError, match=rf"must equal the dense one \(20\); for experts of {d_hidden}, use {hint}\.$"
    ):
        block.load_dense(dense(), init="upcycle")


def test_a_model_deep_copies_after_a_training_forward():
    """EMA / SWA copies and a second conversion deep-copy a model mid-training; the block's router loss
    (part of that forward's graph) is not copied."""
    model = mc.convert(mc.build_tiny_gpt(), strategy="moe", num_experts=4, top_k=2).train()
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    assert mc.aux_loss(model).requires_grad
    twin = copy.deepcopy(model)
    assert float(mc.aux_loss(twin)) == 0.0 and mc.aux_loss(model).requires_grad
    for left, right in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(left, right)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_a_float64_block_passes_gradcheck(router):
    """Router scores are computed in the block's dtype when it is wider than float32 (see the MoT test)."""
    torch.manual_seed(0)
    block = mc.MoEBlock(6, 10, 4, top_k=2, router=router, kernel="torch", gated=True, bias=True).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_the_torch_routing_step_breaks_ties_by_expert_index_as_the_fused_kernel_does():
    """A zero router picks experts 0..k-1, as the fused routing kernel does (tests/kernels compares the two
    kernels; torch.topk leaves ties unordered: on the CPU a zero router's top-2 came out as experts 2, 3)."""
    block = mc.MoEBlock(8, 16, 4, top_k=2, kernel="torch", router_options={"init_std": 0})
    block(torch.randn(5, 8))
    assert mc.stats(block)[""]["expert_load"].tolist() == [5, 5, 0, 0]


def test_shared_experts_start_silent_so_upcycling_stays_exact():
    """DeepSeekMoE's shared experts run for every token: they start with a zero output projection (0.84
    from the dense FFN before, when they started random), and flop sizing counts them among k + S."""
    torch.manual_seed(0)
    dense = mc.DenseFFN(
        w_in=torch.randn(96, 16, dtype=torch.float64),
        w_out=torch.randn(16, 96, dtype=torch.float64),
        b_in=torch.randn(96, dtype=torch.float64),
        b_out=torch.randn(16, dtype=torch.float64),
        activation="gelu",
    )
    block = mc.MoEBlock(16, 96, 4, top_k=2, bias=True, num_shared_experts=1, dtype=torch.float64)
    block.load_dense(dense, init="upcycle")
    x = torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(block.eval()(x), dense.forward(x))
    assert block.shared_experts.w_in.abs().sum() > 0  # still a trainable expert, only its output is zero
    model = torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.GELU(), torch.nn.Linear(96, 16))
    report = mc.inspect(model, num_experts=4, top_k=2, init="random", sizing="flop", num_shared_experts=1)
    assert report.sites[0].expert_hidden == 32  # 96 / (2 + 1)
    assert report.ffn_flops_after / report.ffn_flops_before < 1.05  # the router's FLOPs on top


@pytest.mark.parametrize("router", ["topk", "switch", "hash"])
def test_capacity_drops_tokens_in_training_only(router):
    """In eval every token is routed: a sequence's output does not depend on its batch (with capacity 1.0
    a lone sequence's logits moved by 0.34 when batched, and cached generation differed from uncached)."""
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    block = mc.MoEBlock(
        8, 16, 4, top_k=top_k, router=router, kernel="torch", router_options={"capacity_factor": 1.0}
    )
    with torch.no_grad():
        if router != "hash":
            block.router.gate.weight[:, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])  # feature 0 crowds expert 0
    x = torch.randn(8, 5, 8)
    x[..., 0] = 3.0
    block.train()
    block(x)
    assert mc.stats(block)[""]["dropped_assignments"] > 0
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:1], block(x[:1]), rtol=1e-6, atol=1e-6)
    assert mc.stats(block)[""]["dropped_assignments"] == 0


class _WrongExperts(TopKRouter):
    def __init__(self, d_model, num_experts, top_k, **options):
        super().__init__(d_model, num_experts * 2, top_k, **options)  # routes over experts the block lacks


class _Int32TopK(type(TORCH)):
    def topk_routing(self, logits, top_k, *, bias=None, renormalize=True):
        probs, experts, weights = super().topk_routing(logits, top_k, bias=bias, renormalize=renormalize)
        return probs, experts.int(), weights


class _FailingTopK(type(TORCH)):
    def topk_routing(self, logits, top_k, *, bias=None, renormalize=True):
        raise RuntimeError("fused top-k failed to launch")


class _ContractPlugin:
    @mc.hookimpl
    def register_routers(self, register):
        register("wrong_experts", _WrongExperts)

    @mc.hookimpl
    def register_kernels(self, register):
        register("int32_topk", _Int32TopK)
        register("failing_topk", _FailingTopK)


@pytest.fixture
def contract_plugin():
    mc.register_plugin(_ContractPlugin(), name="contract_plugin")
    yield
    mc.unregister_plugin("contract_plugin")


def test_a_router_built_for_other_experts_is_refused_at_build(contract_plugin) -> None:
    """Its plans would name experts 4..7 of a block with 4: a kernel without bounds checks silently
    computed nothing for those tokens, the torch kernel crashed and was blamed."""
    with pytest.raises(mc.PluginError, match=r"router 'wrong_experts'.*num_experts=8, but the block has 4"):
        mc.MoEBlock(16, 32, 4, top_k=2, router="wrong_experts")


@pytest.mark.parametrize(
    ("kernel", "fragment"),
    [
        ("int32_topk", r"topk_routing returned probs \(6, 4\) torch.float32, experts \(6, 2\) torch.int32"),
        ("failing_topk", r"crashed: RuntimeError: fused top-k failed to launch"),
    ],
)
def test_a_fault_in_the_kernels_routing_step_names_the_kernel(contract_plugin, kernel, fragment) -> None:
    block = mc.MoEBlock(16, 32, 4, top_k=2, router="topk", kernel=kernel)
    with pytest.raises(mc.PluginError, match=rf"kernel '{kernel}' \(plugin 'contract_plugin'\).*{fragment}"):
        block(torch.randn(2, 3, 16))


@pytest.mark.parametrize("router", ["topk", "switch", "hash", "expert_choice"])
def test_a_block_runs_under_inference_mode_as_under_no_grad(router):
    """Serving code runs models under torch.inference_mode, whose tensors have no version counter: the
    check that a plan lists the routing step's picks unchanged read one, and blamed the router as a bug."""
    top_k = 1 if router == "switch" else 2
    block = mc.MoEBlock(16, 32, 4, top_k=top_k, router=router).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        want = block(x)
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_block_pickled_before_kernel_choices_said_builtin_still_runs():
    """A whole-model pickle keeps the block's chosen kernels; one made before KernelChoice.builtin existed
    has none, and the forward read it (AttributeError): it reads as False, the side that checks the picks."""
    from mixcompile.runtime.blocks.base import KernelChoice

    block = mc.MoEBlock(16, 32, 4, top_k=2).eval()
    x = torch.randn(5, 16)
    want = block(x)
    for key, choice in block._kernels.items():
        old = KernelChoice.__new__(KernelChoice)
        old.__dict__.update(name=choice.name, kernel=choice.kernel, source=choice.source)  # no "builtin"
        block._kernels[key] = old
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)
