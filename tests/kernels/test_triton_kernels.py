"""The Triton kernel against the torch reference kernel: outputs and every gradient, fresh random inputs.

Without a GPU the kernels run in Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET`` when a
function is decorated (its own ``tl.cdiv`` / ``tl.sum`` included), so this module imports ``triton``
and ``mixcompile_plugins.triton`` with the variable set, then restores the environment; the
``triton_env`` fixture sets it again only while this module's tests run, so other modules keep
``kernel="auto"`` on the torch kernel.
Uninitialised memory is filled with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), so any
output element a kernel forgets to write shows up as a mismatch. ``test_kernel_resources.py`` compiles the
kernels for real GPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import reference as ref
import torch

import mixcompile as mc
from mixcompile.runtime.activations import ACTIVATIONS
from mixcompile.runtime.kernels import get_kernel, resolve_kernel
from mixcompile.runtime.mixing import MixPlan
from mixcompile.runtime.routing import RoutingPlan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # fp32, relative (norm of the difference over the norm of the reference)


def _import_triton() -> None:
    """Import Triton and the kernels, in interpreter mode when there is no GPU."""
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        triton = pytest.importorskip("triton")
        importlib.import_module("mixcompile_plugins.triton.ops")
    if DEVICE == "cpu" and type(triton.language.cdiv).__name__ != "InterpretedFunction":
        pytest.skip(
            "triton was imported before this module could set TRITON_INTERPRET=1; "
            "run it on its own: python -m pytest tests/kernels/test_triton_kernels.py",
            allow_module_level=True,
        )


_import_triton()
from mixcompile_plugins.triton import cdiv  # noqa: E402 (after the interpreter is chosen)
from mixcompile_plugins.triton.grouped import _partial_offsets, _tile  # noqa: E402
from mixcompile_plugins.triton.mot_kernels import _expert_rows, _members  # noqa: E402
from mixcompile_plugins.triton.ops import _fused_halves, fused_topk_route  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def triton_env():
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
        if DEVICE == "cuda":  # these tests check variants, not tuning: one config per launch
            for tuner in _autotuned():
                first = lambda kwargs, prune=tuner.prune_configs: prune(kwargs)[:1]  # noqa: E731
                mp.setattr(tuner, "prune_configs", first)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)


def triton_kernel():
    return get_kernel("triton")


def torch_kernel():
    return get_kernel("torch")


def make_experts(e=4, d=24, h=40, act="gelu", gated=False, bias=False, dtype=torch.float32):
    experts = mc.StackedExperts(e, d, h, activation=act, gated=gated, bias=bias, device=DEVICE, dtype=dtype)
    if bias:  # nn.Linear's init makes biases small; make them matter
        with torch.no_grad():
            for name in ("b_in", "b_gate", "b_out"):
                if getattr(experts, name) is not None:
                    getattr(experts, name).normal_(0.0, 0.5)
    return experts


def topk_plan(n, e, k, *, empty_expert=True, seed=0):
    """Each token picks k distinct experts (never the last one if ``empty_expert``); random weights."""
    g = torch.Generator().manual_seed(seed)
    pool = e - 1 if empty_expert else e
    chosen = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(n)])
    return make_plan(torch.arange(n).repeat_interleave(k), chosen.reshape(-1), n, e, seed, pairs_per_token=k)


def make_plan(tokens, experts, n, e, seed=0, pairs_per_token=None):
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.rand(tokens.numel(), generator=g).to(DEVICE).requires_grad_()
    return RoutingPlan(tokens.to(DEVICE), experts.to(DEVICE), weight, n, e, pairs_per_token=pairs_per_token)


def moe_run(kernel, x, plan, experts):
    """Output and gradients (input, routing weights, every expert tensor) for a fixed random cotangent."""
    x = x.detach().clone().requires_grad_()
    weight = plan.weight.detach().clone().requires_grad_()
    plan = dataclasses.replace(plan, weight=weight)
    y = kernel.moe(x, plan, experts)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    inputs = [x, weight, *experts.parameters()]
    names = ["x", "weight", *(n for n, _ in experts.named_parameters())]
    if not y.requires_grad:  # the reference's output for a plan without pairs is a constant
        return y, dict.fromkeys(names)
    grads = torch.autograd.grad(y, inputs, cotangent, allow_unused=True)
    return y, dict(zip(names, grads, strict=True))


def assert_close(got, want, tol=TOL, what=""):
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten output?)"
    err = ref.rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.2e}"


def check_moe(x, plan, experts, tol=TOL):
    y, grads = moe_run(triton_kernel(), x, plan, experts)
    y_ref, grads_ref = moe_run(torch_kernel(), x, plan, experts)
    assert_close(y, y_ref, tol, "output")
    for name, g in grads_ref.items():
        if g is None:
            assert grads[name] is None or not grads[name].any(), name
        else:
            assert_close(grads[name], g, tol, f"grad {name}")


def _tile_shapes() -> list[tuple[int, int, int]]:
    from mixcompile_plugins.triton.grouped import _SHAPES

    return sorted({shape[:3] for shape in _SHAPES}, reverse=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs any tile; on a GPU the tuner's own choice")
@pytest.mark.parametrize("tile", _tile_shapes(), ids=lambda t: "x".join(map(str, t)))
def test_every_tuned_tile_shape_computes_the_reference(monkeypatch, tile):
    """The interpreter runs one small tile (a GPU only what its tuner picks), so the tile shapes the tuner
    chooses from on a GPU are run here, every grouped kernel forced to each: MoE (gated with biases, and
    plain) and MoT, forward and every gradient, at sizes that leave a partial tile in every dimension
    (rows per expert, the hidden and model widths) and an expert without rows."""
    import triton

    from mixcompile_plugins.triton import grouped

    block_m, block_n, block_k = tile
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_stages=1)
    for tuner in _autotuned():
        monkeypatch.setattr(tuner, "configs", [config])
    assert {tuner.configs[0].kwargs["BLOCK_N"] for tuner in _autotuned()} == {block_n}
    tokens, d, h = 70, 80, 136  # 140 pairs over 3 of 4 experts; 80 and 136: partial K and N tiles
    x = torch.randn(tokens, d, device=DEVICE)
    for gated, bias in ((True, True), (False, False)):
        check_moe(x, topk_plan(tokens, 4, 2), make_experts(d=d, h=h, gated=gated, bias=bias))
    block, fused = mot_blocks(4, False, True, mixer_options={"init_std": 0.5})
    check_block(block, fused, torch.randn(6, 37, 24, device=DEVICE))  # 37 rows per expert
    assert grouped._up_kernel.configs == [config]


def test_uninitialised_memory_is_poisoned():
    assert torch.isnan(torch.empty(4, device=DEVICE)).all()


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_moe_every_activation(act, gated, bias):
    experts = make_experts(act=act, gated=gated, bias=bias)
    x = torch.randn(37, 24, device=DEVICE)
    check_moe(x, topk_plan(37, 4, 2, seed=len(act)), experts)


class _TanhFloat64:
    """A plain tanh MoE in float64 (the reference's activations have no tanh), as :func:`moe_run` calls a
    kernel: its gradients reach the float32 inputs rounded once."""

    @staticmethod
    def moe(x, plan, experts):
        tokens, chosen = plan.token_index, plan.expert_index
        pre = torch.einsum("pd,phd->ph", x.double()[tokens], experts.w_in.double()[chosen])
        out = torch.einsum("ph,pdh->pd", torch.tanh(pre), experts.w_out.double()[chosen])
        out = out * plan.weight.double()[:, None]
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device).index_add(0, tokens, out)


@pytest.mark.parametrize("scale", [1.0, 1e-1, 1e-2, 1e-4, 1e-6])
def test_tanh_keeps_its_relative_accuracy_for_small_pre_activations(scale):
    """Triton's tanh is built from exp, whose ``(1 - e^{-2|x|}) / (1 + e^{-2|x|})`` cancels as x -> 0 (fp32
    relative errors of 4e-4 at pre-activations of 1e-4, 3e-2 at 1e-6). Output and every gradient against
    float64, at pre-activation scales from 1 (the exp form) to 1e-6 (the series; 0.1 takes both)."""
    experts = make_experts(act="tanh")
    x = torch.randn(37, 24, device=DEVICE) * scale
    plan = topk_plan(37, 4, 2)
    y, grads = moe_run(triton_kernel(), x, plan, experts)
    y_ref, grads_ref = moe_run(_TanhFloat64(), x, plan, experts)
    assert_close(y, y_ref, 1e-5, "output")
    for name, g in grads_ref.items():
        assert_close(grads[name], g, 1e-5, f"grad {name}")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_moe_plain_gated_bias(gated, bias):
    experts = make_experts(act="silu", gated=gated, bias=bias)
    x = torch.randn(29, 24, device=DEVICE)
    check_moe(x, topk_plan(29, 4, 2, empty_expert=False, seed=3), experts)


@pytest.mark.parametrize(
    "case",
    [
        "single_token",
        "one_expert_takes_all",
        "no_pairs",
        "tokens_without_pairs",
        "expert_choice",
        "top1",
        "strided_pairs",
    ],
)
def test_moe_ragged_plans(case):
    n, e = {"single_token": (1, 4), "top1": (50, 6)}.get(case, (19, 4))
    # gated where no pair reaches any expert too: the gate is still owed a (zero) gradient
    experts = make_experts(e=e, gated=case in ("expert_choice", "no_pairs"), bias=True)
    x = torch.randn(n, 24, device=DEVICE)
    if case == "single_token":
        plan = topk_plan(1, e, 2, empty_expert=False)
    elif case == "top1":
        plan = topk_plan(n, e, 1, empty_expert=False)
    elif case == "one_expert_takes_all":
        plan = make_plan(torch.arange(n), torch.full((n,), 2), n, e)
    elif case == "no_pairs":
        plan = make_plan(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), n, e)
    elif case == "tokens_without_pairs":  # a capacity-limited plan: some tokens were dropped
        plan = make_plan(torch.tensor([0, 3, 3, 7, 8, 18]), torch.tensor([1, 0, 2, 1, 1, 3]), n, e)
    elif case == "strided_pairs":  # column views of [N, 2] tensors, as a router slicing its top-k may give
        both = make_plan(torch.arange(n).repeat(2), torch.randint(0, e, (2 * n,)), n, e)
        columns = [t.detach().reshape(n, 2)[:, 0] for t in (both.token_index, both.expert_index, both.weight)]
        assert columns[0].stride() == (2,)
        plan = dataclasses.replace(both, token_index=columns[0], expert_index=columns[1], weight=columns[2])
    else:  # expert choice: each expert takes 6 tokens, so a token can have 0..E pairs
        g = torch.Generator().manual_seed(5)
        tokens = torch.cat([torch.randperm(n, generator=g)[:6] for _ in range(e)])
        plan = make_plan(tokens, torch.arange(e).repeat_interleave(6), n, e)
    check_moe(x, plan, experts)


def test_moe_is_deterministic():
    experts = make_experts(gated=True, bias=True)
    x = torch.randn(37, 24, device=DEVICE)
    plan = topk_plan(37, 4, 3, empty_expert=False)
    (y1, g1), (y2, g2) = (moe_run(triton_kernel(), x, plan, experts) for _ in range(2))
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1 if g1[k] is not None)


def test_inference_calls_give_the_training_calls_outputs():
    """Calls autograd will not record (no grad mode; or nothing requires grad) skip the autograd Function:
    the same outputs, bit for bit, and nothing recorded."""
    experts = make_experts(gated=True, bias=True)
    x = torch.randn(23, 24, device=DEVICE)
    plan = topk_plan(23, 4, 2, seed=4)
    y, _ = moe_run(triton_kernel(), x, plan, experts)
    frozen = copy.deepcopy(experts).requires_grad_(False)
    plain = dataclasses.replace(plan, weight=plan.weight.detach())
    with torch.no_grad():
        y_no_grad = triton_kernel().moe(x, plan, experts)
    y_frozen = triton_kernel().moe(x, plain, frozen)
    for got in (y_no_grad, y_frozen):
        assert got.grad_fn is None and torch.equal(got, y)
    logits = torch.randn(23, 4, device=DEVICE)
    trained = fused_topk_route(logits.clone().requires_grad_(), None, 2, True)
    with torch.no_grad():
        inferred = fused_topk_route(logits, None, 2, True)
    for a, b in zip(inferred, trained, strict=True):
        assert a.grad_fn is None and torch.equal(a, b.detach())


def test_fused_halves_only_for_two_halves_that_cover_one_tensor():
    """The backward writes a gate and up weight's gradients into the halves of one new tensor only when the
    two weights are exactly the halves of one (any split, any strides); otherwise each gets its own."""
    fused = torch.randn(3, 10, 4)
    for gate, up in [
        (fused[:, :5], fused[:, 5:]),  # concatenated
        (fused[:, 0::2], fused[:, 1::2]),  # interleaved
        (fused[:, 5:], fused[:, :5]),  # either order
    ]:
        d_up, d_gate = _fused_halves(up, gate)
        assert d_up._base is d_gate._base and d_up._base.shape == fused.shape
        assert (d_up.stride(), d_gate.stride()) == (up.stride(), gate.stride())
        d_up.copy_(up)
        d_gate.copy_(gate)
        torch.testing.assert_close(d_up._base, fused)  # the halves land where the weights' halves are
    transposed = torch.randn(3, 4, 10).mT  # transformers' is_transposed layout
    d_up, d_gate = _fused_halves(transposed[:, 5:], transposed[:, :5])
    assert d_up._base.stride() == transposed.mT.stride()
    wider = torch.randn(3, 12, 4)
    for gate, up in [
        (fused[:, :5], fused[:, :5]),  # the same half twice
        (fused[:, :4], fused[:, 4:8]),  # not all of it
        (wider[:, :5], wider[:, 5:10]),  # a larger tensor's parts
        (fused[:, :5], fused[:, 5:].clone()),  # two tensors
        (fused[:, 0::2], fused[:, 5:]),  # different strides
        (None, fused[:, 5:]),  # no gate
    ]:
        assert _fused_halves(up, gate) is None


def _expert_choice_pairs(experts: int, tokens: int, per_expert: int, g: torch.Generator):
    """Each expert's ``per_expert`` distinct tokens (as expert choice picks them), in shuffled plan order."""
    token = torch.stack([torch.randperm(tokens, generator=g)[:per_expert] for _ in range(experts)])
    expert = torch.arange(experts).repeat_interleave(token.shape[1])
    shuffle = torch.randperm(expert.numel(), generator=g)  # the plan's order must not matter
    return token.reshape(-1)[shuffle], expert[shuffle]


@pytest.mark.parametrize(
    "experts,pairs",
    [(1, 5), (3, 7), (8, 0), (8, 1), (8, 1024), (8, 2500), (64, 128), (64, 300), (256, 96), (256, 250),
     (300, 40)],
)  # fmt: skip
@pytest.mark.parametrize("k", [0, 2])
def test_counting_sort_by_expert(experts, pairs, k):
    """The counting sort against argsort: the same stable order, expert runs, gathered rows and weights,
    and each token's pairs: with pairs_per_token, in plan order; without, counted by token and listed in
    the order a stable argsort by token gives. Sizes span one chunk and several (a chunk holds
    8192 / E_pow2 pairs), empty experts and tokens, and the argsort path past 256 experts."""
    from mixcompile_plugins.triton.sorting import sort_by_expert

    g = torch.Generator().manual_seed(experts * 1000 + pairs)
    if k:
        pairs -= pairs % k
        tokens = pairs // k
        token_index = torch.arange(pairs) // k
        expert_index = torch.randint(0, max(1, experts // 2 + 1), (pairs,), generator=g)
    else:  # a token at most once per expert; about half the experts take tokens, some tokens none
        used = max(1, experts // 2 + 1)
        per_expert = cdiv(pairs, used)
        tokens = max(50, 2 * per_expert)
        token_index, expert_index = _expert_choice_pairs(used, tokens, per_expert, g)
    token_index, expert_index = token_index.to(DEVICE), expert_index.to(DEVICE)
    pairs = token_index.numel()
    weight = torch.rand(pairs, generator=g).to(DEVICE, torch.bfloat16)
    got = sort_by_expert(token_index, expert_index, weight, tokens, experts, k)
    order = torch.argsort(expert_index, stable=True)
    assert torch.equal(got.order, order)
    assert torch.equal(got.expert, expert_index[order])
    assert torch.equal(got.rows, token_index[order].int())
    assert torch.equal(got.weight, weight[order].float())
    bounds = torch.arange(experts + 1, device=DEVICE)  # on the GPU too (searchsorted refused a CPU one)
    assert torch.equal(got.offsets, torch.searchsorted(expert_index[order], bounds).int())
    if k:
        assert torch.equal(got.order[got.by_token.long()], torch.arange(pairs, device=DEVICE))
        assert torch.equal(got.token_offsets, torch.arange(0, pairs + 1, k, dtype=torch.int32, device=DEVICE))
        return
    by_token = torch.argsort(got.rows, stable=True)
    assert torch.equal(got.by_token, by_token.int())
    bounds = torch.arange(tokens + 1, dtype=torch.int32, device=DEVICE)
    starts = torch.searchsorted(got.rows[by_token], bounds)
    assert torch.equal(got.token_offsets, starts.int())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pairs,d", [(0, 24), (7, 1), (37, 24), (300, 1030)])
def test_scaled_rows_gather_and_scale_in_one_rounding(dtype, pairs, d):
    """The backward's sorted output gradient: ``src[rows] * scale`` in fp32, rounded once to src's dtype
    (rows repeat, as a token's pairs do; d spans a partial block and several)."""
    from mixcompile_plugins.triton.moe_kernels import scaled_rows

    g = torch.Generator().manual_seed(pairs * 31 + d)
    src = torch.randn(23, d, generator=g).to(DEVICE, dtype)
    rows = torch.randint(0, 23, (pairs,), generator=g).to(DEVICE, torch.int32)
    scale = torch.rand(pairs, generator=g).to(DEVICE)
    got = scaled_rows(src, rows, scale)
    expected = (src.double()[rows.long()] * scale.double()[:, None]).to(dtype)
    assert got.dtype == dtype and got.shape == (pairs, d)
    if DEVICE == "cpu" and dtype == torch.bfloat16:  # Triton's interpreter rounds to bf16 toward zero
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
    else:  # one rounding of an exact fp32 product (fp16's and bf16's values times an fp32 one)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cells", ["counted", "argsort"])
def test_a_token_routed_twice_to_one_expert_still_gets_every_pair(monkeypatch, cells):
    """A malformed plan (only the debug checks look for it) that routes a token to an expert twice: each
    token still lists exactly its own pairs, every sorted pair once (never an unwritten slot that the
    combine would read as a row index)."""
    from mixcompile_plugins.triton import sorting

    if cells == "argsort":
        monkeypatch.setattr(sorting, "MAX_COUNTED_CELLS", 0)
    token_index = torch.tensor([3, 0, 3, 1, 3, 3, 0, 2], device=DEVICE)
    expert_index = torch.tensor([1, 1, 1, 0, 2, 1, 1, 0], device=DEVICE)
    got = sorting.sort_by_expert(token_index, expert_index, torch.ones(8, device=DEVICE), 5, 3, 0)
    assert torch.equal(got.by_token.sort().values.long(), torch.arange(8, device=DEVICE))
    assert got.token_offsets.tolist() == [0, 2, 3, 4, 8, 8]
    listed = got.rows[got.by_token.long()]
    assert listed.tolist() == [0, 0, 1, 2, 3, 3, 3, 3]


def test_a_pair_outside_the_plan_s_tokens_is_listed_for_no_token():
    """Under torch.compile no check reads a plan's indices back: a token index past num_tokens must not be
    counted into (or past the end of) the [N, E] table; the tokens in range keep their lists."""
    from mixcompile_plugins.triton import sorting

    token_index = torch.tensor([1, 0, 9, 1], device=DEVICE)
    expert_index = torch.tensor([0, 1, 1, 1], device=DEVICE)
    got = sorting.sort_by_expert(token_index, expert_index, torch.ones(4, device=DEVICE), 2, 2, 0)
    assert got.token_offsets.tolist() == [0, 1, 3]
    assert got.rows[got.by_token[:3].long()].tolist() == [0, 1, 1]


def test_a_plan_whose_pairs_do_not_match_pairs_per_token_is_refused():
    """Kernels are called with plans that no router check saw (expert parallelism, direct callers): a count
    that contradicts pairs_per_token is an error, not a combine reading past its offsets."""
    plan = topk_plan(9, 4, 2)
    short = dataclasses.replace(
        plan, token_index=plan.token_index[1:], expert_index=plan.expert_index[1:], weight=plan.weight[1:]
    )
    with pytest.raises(ValueError, match=r"pairs_per_token=2 and 9 tokens must list 18 pairs, got 17"):
        triton_kernel().moe(torch.randn(9, 24, device=DEVICE), short, make_experts())


def test_moe_pairs_per_token_gives_what_the_sorted_tokens_give():
    """A plan declaring pairs_per_token skips the sort by token: same output and gradients (to rounding:
    a token's pairs are summed in plan order rather than expert order) as the same plan without it."""
    experts = make_experts(gated=True, bias=True)
    x = torch.randn(37, 24, device=DEVICE)
    plan = topk_plan(37, 4, 3, empty_expert=False)
    y, grads = moe_run(triton_kernel(), x, plan, experts)
    y_ref, grads_ref = moe_run(triton_kernel(), x, dataclasses.replace(plan, pairs_per_token=None), experts)
    assert_close(y, y_ref, 1e-6, "output")
    for name, g in grads_ref.items():
        assert_close(grads[name], g, 1e-6, f"grad {name}")


@pytest.mark.parametrize(
    "router,options",
    [("topk", {}), ("topk", {"capacity_factor": 0.6}), ("switch", {}), ("expert_choice", {})],
)
def test_moe_block_end_to_end(router, options):
    """Same weights, kernel='triton' vs 'torch': output and every gradient (the router's gate too)."""
    torch.manual_seed(11)
    top_k = 1 if router == "switch" else 2
    block = mc.MoEBlock(
        24, 40, 4, top_k=top_k, gated=True, bias=True, router=router, kernel="torch",
        router_options={"init_std": 0.5, **options}, device=DEVICE,
    )  # fmt: skip
    fused = copy.deepcopy(block)
    fused.kernel = "triton"
    x = torch.randn(3, 9, 24, device=DEVICE)
    outs = []
    for b in (block, fused):
        xi = x.clone().requires_grad_()
        y = b(xi)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum() + b.last_aux_loss
        loss.backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in b.named_parameters()}))
    (y_ref, dx_ref, grads_ref), (y, dx, grads) = outs
    assert fused.last_stats["kernel"] == "triton"
    assert_close(y, y_ref, what="output")
    assert_close(dx, dx_ref, what="grad x")
    assert grads_ref["router.gate.weight"].abs().sum() > 0
    for name, g in grads_ref.items():
        assert_close(grads[name], g, what=f"grad {name}")


def mot_blocks(group, gated, bias, **kwargs):
    torch.manual_seed(group)
    block = mc.MoTBlock(
        24, 40, 3, group_size=group, gated=gated, bias=bias, kernel="torch", device=DEVICE, **kwargs
    )
    fused = copy.deepcopy(block)
    fused.kernel = "triton"
    return block, fused


def check_block(block, fused, x, tol=TOL):
    """A block against its fused copy: output and all gradients (a MoT controller's only where it has one).
    The reference block may be in float64 (``x`` goes to each block in its dtype)."""
    outs = []
    for b in (block, fused):
        xi = x.to(next(b.parameters()).dtype, copy=True).requires_grad_()
        y = b(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in b.named_parameters()}))
    (y_ref, dx_ref, grads_ref), (y, dx, grads) = outs
    assert fused.last_stats["kernel"] == "triton"
    assert_close(y, y_ref, tol, "output")
    assert_close(dx, dx_ref, tol, "grad x")
    for name, g in grads_ref.items():
        if g is None or not g.any():
            assert grads[name] is None or not grads[name].any(), name
        else:
            assert_close(grads[name], g, tol, f"grad {name}")
    return grads_ref


@pytest.mark.parametrize(
    "batch,group,gated,bias,emit",
    [
        (8, 4, False, True, "merge"),
        (5, 4, True, False, "merge"),  # B not divisible by G: a group with 1 member of 4
        (7, 3, True, True, "experts"),
        (3, 1, False, False, "merge"),  # G = 1
        (2, 4, False, True, "experts"),  # batch < G
    ],
)
def test_mot_block_end_to_end(batch, group, gated, bias, emit):
    block, fused = mot_blocks(group, gated, bias, mixer_options={"emit": emit, "init_std": 0.5})
    grads = check_block(block, fused, torch.randn(batch, 6, 24, device=DEVICE))
    assert (grads["mixer.controller.weight"].abs().sum() > 0) == (min(batch, group) > 1)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_mot_with_a_tiny_d_model_matches_float64(d):
    """d below the mixing kernels' d tile, which is at least 16 wide (the K of their weight gradients' dots):
    the masks zero the padding. Output and every gradient against the torch kernel in float64."""
    torch.manual_seed(d)
    fused = mc.MoTBlock(
        d, 40, 3, group_size=4, gated=True, bias=True, kernel="triton", device=DEVICE,
        mixer_options={"init_std": 0.5},
    )  # fmt: skip
    exact = copy.deepcopy(fused)
    exact.kernel = "torch"
    check_block(exact.double(), fused, torch.randn(7, 6, d, device=DEVICE), tol=1e-5)


@pytest.mark.parametrize("shape", [(2, 0, 24), (0, 3, 24)])
def test_an_empty_gated_mot_batch_gives_zero_gradients(shape):
    """An empty batch saves empty gate pre-activations; the gate's gradient is still its zeros."""
    block, fused = mot_blocks(2, True, False)
    for b in (block, fused):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        b(x).sum().backward()
        torch.testing.assert_close(b.experts.w_gate.grad, torch.zeros_like(b.experts.w_gate))


@pytest.fixture
def no_launches(monkeypatch):
    """Every Triton kernel launch does nothing: kernels allocate nothing, so what the host allocates around
    them is what a GPU would hold."""
    from mixcompile_plugins.triton import grouped

    monkeypatch.setattr(type(grouped._up_kernel.fn), "run", lambda *args, **kwargs: None)


def _peak_bytes(step) -> int:
    """Peak bytes allocated by ``step()`` above what was allocated before it (CPU allocator, this thread)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("gated", [False, True])
def test_moe_backward_drops_the_hidden_layer_before_the_weight_gradients(no_launches, monkeypatch, gated):
    """The recomputed hidden layer ``[P, h]`` is read by the down projection's weight gradient only: it is
    dropped before the up (and gate) weight gradients are allocated, where the peak would otherwise be
    (kernels stubbed, the pairs sorted with argsort so that the host's index ops stay in range)."""
    from mixcompile_plugins.triton import moe_kernels, sorting

    monkeypatch.setattr(moe_kernels, "sort_by_expert", sorting._argsort_by_expert)
    e, n, k, d, h = 4, 64, 2, 16, 512
    experts = make_experts(e=e, d=d, h=h, act="silu" if gated else "gelu", gated=gated).tensors
    plan = topk_plan(n, e, k, empty_expert=False)
    x, dy = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    routing = moe_kernels.route(plan.token_index, plan.expert_index, plan.weight.detach(), n, e, k)
    pairs = plan.token_index.numel()
    pre = torch.empty(pairs, h, device=DEVICE)
    pre_gate = torch.empty(pairs, h, device=DEVICE) if gated else None
    act = "silu" if gated else "gelu"
    peak = _peak_bytes(
        lambda: moe_kernels.moe_backward(dy, x, routing, torch.float32, experts, pre, pre_gate, act)
    )
    hidden_sized, weight, rows = pairs * h * 4, e * h * d * 4, pairs * d * 4
    assert peak < (2 + gated) * hidden_sized + (1.5 + gated) * weight + 4 * rows


def test_mot_inference_holds_one_mixed_sized_tensor_and_the_next(no_launches):
    """Without grad the MoT forward drops the mixed tokens once the up projection has read them and the
    hidden layer once the down projection has: never the mixed tokens, the hidden layer and the experts'
    outputs together (kernels stubbed, as below)."""
    from mixcompile_plugins.triton import mot_kernels

    e, t, n, g, d, h = 4, 32, 1, 4, 256, 64
    experts = make_experts(e=e, d=d, h=h).tensors
    x_g = torch.randn(t, n, g, d, device=DEVICE)
    merge = torch.rand(t, n, g, e, device=DEVICE).softmax(2)
    peak = _peak_bytes(lambda: mot_kernels.mot_forward(x_g, merge, merge, experts, "gelu", save=False))
    mixed_sized, hidden_sized = e * t * n * d * 4, e * t * n * h * 4
    assert peak < 2 * mixed_sized + hidden_sized / 2  # was mixed + hidden + out + y


@pytest.mark.parametrize("gated", [False, True])
def test_mot_backward_never_holds_three_mixed_sized_tensors(no_launches, gated):
    """The MoT backward's ``[E·T·n, d]`` intermediates (the output's gradient, the recomputed mixed tokens,
    their gradient) are each dropped after the last kernel that reads them, so at most two are alive at once
    (the peak memory of a MoT training step). Kernels are stubbed: they allocate nothing, so what the host
    allocates is what the GPU would hold; d is large against h so that these tensors dominate."""
    from mixcompile_plugins.triton import mot_kernels

    e, t, n, g, d, h = 4, 32, 1, 4, 256, 16
    experts = make_experts(e=e, d=d, h=h, act="silu" if gated else "gelu", gated=gated).tensors
    x_g = torch.randn(t, n, g, d, device=DEVICE)
    merge = torch.rand(t, n, g, e, device=DEVICE).softmax(2)
    dy = torch.randn_like(x_g)
    act = "silu" if gated else "gelu"
    _, pre, pre_gate, out = mot_kernels.mot_forward(x_g, merge, merge, experts, act, save=True)
    assert pre is not None and out is not None
    peak = _peak_bytes(
        lambda: mot_kernels.mot_backward(dy, x_g, merge, merge, experts, pre, pre_gate, out, act, False)
    )
    mixed_sized, hidden_sized, weight = e * t * n * d * 4, e * t * n * h * 4, e * h * d * 4
    weights = (3 if gated else 2) * weight
    assert peak < 2.5 * mixed_sized + (3 if gated else 2) * hidden_sized + weights + x_g.numel() * 4


def test_mot_sparse_mode_and_sequence_first():
    options = {"mode": "sparse", "layout": "seq_first", "mixer_options": {"init_std": 0.5}}
    block, fused = mot_blocks(4, True, True, **options)
    check_block(block, fused, torch.randn(5, 6, 24, device=DEVICE))


@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_second_order_gradients_are_refused(kind):
    """The kernels' backward is not differentiable: a backward that builds a graph (create_graph=True) raises
    naming the torch kernel, instead of the wrong second-order gradients it gave. A plain backward and
    checkpointing (which runs the forward again inside backward, not the backward in grad mode) still run."""
    if kind == "moe":
        torch.manual_seed(0)
        block = mc.MoEBlock(24, 40, 4, top_k=2, gated=True, kernel="triton", device=DEVICE)
    else:
        block = mot_blocks(2, False, True, mixer_options={"init_std": 0.5})[1]
    x = torch.randn(4, 5, 24, device=DEVICE, requires_grad=True)
    with pytest.raises(mc.ConfigError, match='backward is not differentiable.*kernel="torch" supports them'):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    (dx,) = torch.autograd.grad(block(x).square().sum(), x)
    for reentrant in (False, True):
        x.grad = None
        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant).square().sum().backward()
        assert_close(x.grad, dx, 1e-6, f"checkpointed, use_reentrant={reentrant}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """16-bit inputs, fp32 accumulation: within the reference's own rounding error."""
    experts = make_experts(gated=True, bias=True, dtype=dtype)
    x = torch.randn(37, 24, device=DEVICE, dtype=dtype)
    check_moe(x, topk_plan(37, 4, 2), experts, tol=3e-2)
    block, fused = mot_blocks(4, False, True, dtype=dtype, mixer_options={"init_std": 0.5})
    check_block(block, fused, torch.randn(6, 5, 24, device=DEVICE, dtype=dtype), tol=3e-2)


def test_blocks_under_autocast():
    """Autocast hands the kernel bfloat16 rows and float32 expert weights; it must compute in bfloat16."""
    torch.manual_seed(0)
    moe = mc.MoEBlock(24, 40, 4, top_k=2, gated=True, bias=True, kernel="torch", device=DEVICE)
    fused_moe = copy.deepcopy(moe)
    fused_moe.kernel = "triton"
    mot, fused_mot = mot_blocks(2, True, True, mixer_options={"init_std": 0.5})
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        check_block(moe, fused_moe, torch.randn(3, 7, 24, device=DEVICE), tol=3e-2)
        check_block(mot, fused_mot, torch.randn(5, 6, 24, device=DEVICE), tol=3e-2)
        assert fused_mot(torch.randn(2, 3, 24, device=DEVICE)).dtype == torch.bfloat16


def test_kernel_selection(monkeypatch):
    kernel = triton_kernel()
    assert kernel.priority > torch_kernel().priority
    assert kernel.supports("moe", torch.device(DEVICE), torch.bfloat16)
    assert not kernel.supports("moe", torch.device(DEVICE), torch.float64)
    assert not kernel.supports("other", torch.device(DEVICE), torch.float32)
    # auto runs MoT on CUDA through the torch kernel (faster eagerly, see README Performance); the
    # interpreter's runs take the Triton one
    mot = "torch" if DEVICE == "cuda" else "triton"
    assert resolve_kernel("auto", "mot", torch.device(DEVICE), torch.float32)[0] == mot
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel.supports("moe", torch.device("cpu"), torch.float32)
    assert resolve_kernel("auto", "moe", torch.device("cpu"), torch.float32)[0] == "torch"


def moe_op_args(gated=True, bias=True, n=11):
    experts = make_experts(gated=gated, bias=bias)
    x = torch.randn(n, 24, device=DEVICE, requires_grad=True)
    plan = topk_plan(n, 4, 2)
    tensors = (experts.w_in, experts.w_gate, experts.w_out, experts.b_in, experts.b_gate, experts.b_out)
    return x, plan, experts, tensors


def test_opcheck_moe():
    from mixcompile_plugins.triton import ops

    x, plan, experts, tensors = moe_op_args()
    for k in (0, plan.pairs_per_token):
        args = (x, plan.token_index, plan.expert_index, plan.weight, *tensors, "gelu", True, k)
        torch.library.opcheck(ops.moe_forward_op, args)


def test_opcheck_mot():
    from mixcompile_plugins.triton import ops

    experts = make_experts(e=3, gated=False, bias=True)
    x_g = torch.randn(4, 2, 3, 24, device=DEVICE).permute(0, 2, 1, 3).requires_grad_()  # a strided view
    merge = torch.softmax(torch.randn(4, 3, 2, 3, device=DEVICE), dim=2).requires_grad_()
    emit = torch.rand(4, 3, 2, 3, device=DEVICE).requires_grad_()
    tensors = (experts.w_in, experts.w_gate, experts.w_out, experts.b_in, experts.b_gate, experts.b_out)
    torch.library.opcheck(ops.mot_forward_op, (x_g, merge, emit, *tensors, "silu", True))


ROUTE_CASES = {  # (tokens, experts, k, renormalize, selection bias)
    "topk": (37, 8, 2, True, False),
    "ragged_experts": (70, 12, 4, True, True),
    "switch": (19, 6, 1, False, False),
    "raw_weights_with_bias": (5, 5, 3, False, True),
    "one_token_all_experts": (1, 4, 4, True, False),
}


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_fused_routing_matches_float64(case):
    """softmax -> (+ bias for selection) -> top-k -> renormalise, and the logits' gradient through both
    outputs the router uses (the probabilities feed the aux losses, the weights the combine)."""
    from mixcompile_plugins.triton import ops

    n, e, k, renormalize, with_bias = ROUTE_CASES[case]
    logits = torch.randn(n, e, device=DEVICE, dtype=torch.float64)
    bias = torch.randn(e, device=DEVICE) * 0.1 if with_bias else None
    fused_logits = logits.float().requires_grad_()
    probs, chosen, weights = ops.topk_route_op(fused_logits, bias, k, renormalize)

    exact_logits = logits.clone().requires_grad_()
    exact_probs = torch.softmax(exact_logits, dim=-1)
    exact_chosen = torch.topk(exact_probs + (0 if bias is None else bias.double()), k, dim=-1).indices
    exact_weights = exact_probs.gather(-1, exact_chosen)
    if renormalize:
        exact_weights = exact_weights / exact_weights.sum(-1, keepdim=True)

    assert torch.equal(chosen, exact_chosen)
    assert_close(probs, exact_probs, what="probs")
    assert_close(weights, exact_weights, what="weights")
    d_probs, d_weights = torch.randn(n, e, device=DEVICE), torch.randn(n, k, device=DEVICE)
    ((probs * d_probs).sum() + (weights * d_weights).sum()).backward()
    ((exact_probs * d_probs).sum() + (exact_weights * d_weights).sum()).backward()
    assert_close(fused_logits.grad, exact_logits.grad, what="grad logits")


def test_opcheck_routing():
    from mixcompile_plugins.triton import ops

    logits = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.topk_route_op, (logits, torch.randn(6, device=DEVICE), 2, True))


@pytest.mark.parametrize(
    ("router", "options", "fused"),
    [
        ("topk", {"router_options": {"bias_balancing": True}}, True),
        ("switch", {"top_k": 1}, True),
        ("topk", {"router_options": {"order": "topk_softmax"}}, False),  # Mixtral's order: not this step
    ],
)
def test_routers_take_the_fused_step_where_it_applies(monkeypatch, router, options, fused):
    """The block's kernel decides: the Triton kernel routes with the fused step, ``kernel="torch"`` never
    reaches it (though Triton could run here), and both route the same way."""
    from mixcompile_plugins.triton import ops

    real, calls = ops.fused_topk_route, []
    monkeypatch.setattr(ops, "fused_topk_route", lambda *args: calls.append(args) or real(*args))
    torch.manual_seed(0)
    block = mc.MoEBlock(24, 40, 4, router=router, kernel="triton", device=DEVICE, **options)
    x = torch.randn(9, 24, device=DEVICE)
    y = block(x)
    assert bool(calls) == fused
    calls.clear()
    block.kernel = "torch"
    assert_close(y, block(x), what="fused vs PyTorch routing")
    assert calls == []


def test_torch_compile_has_no_graph_breaks():
    from mixcompile_plugins.triton import ops

    x, plan, experts, _ = moe_op_args(n=13)

    def moe_step(x, weight):
        p = RoutingPlan(plan.token_index, plan.expert_index, weight, plan.num_tokens, plan.num_experts)
        return ops.moe(x, p, experts)

    def mot_step(x_g, merge):
        return ops.mot(x_g, MixPlan(merge, merge), experts)

    x_g = torch.randn(3, 2, 4, 24, device=DEVICE, requires_grad=True)
    merge = torch.softmax(torch.randn(3, 2, 4, 4, device=DEVICE), dim=2).requires_grad_()
    for step, args in ((moe_step, (x, plan.weight)), (mot_step, (x_g, merge))):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        eager_out = step(*args)
        out = compiled(*args)
        assert_close(out, eager_out, what=step.__name__)
        grads = torch.autograd.grad(out.square().sum(), args)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), args)
        for g, eg in zip(grads, eager_grads, strict=True):
            assert_close(g, eg, what=f"{step.__name__} grad")


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mixcompile_plugins.triton import ops

    x, plan, experts, tensors = moe_op_args(gated=False, bias=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y, pre, pre_gate, routing = ops.moe_forward_op(
            x, plan.token_index, plan.expert_index, plan.weight, *tensors, "relu", True, 2
        )
    assert y.shape == x.shape and pre.shape == (22, 40) and pre_gate.numel() == 0
    assert routing.shape == (4 * 22 + 4 + 11 + 2,) and routing.dtype == torch.int32


@pytest.mark.parametrize("rows,columns", [((5, 0, 40, 17), 3), ((300, 2, 1), 20), ((1,), 1)])
def test_grouped_program_order_covers_every_tile_once(rows, columns):
    """Programs take (row block, column tile) in groups of row blocks (for L2 reuse of the weights): every
    row block of every expert meets every column tile exactly once, whatever the group count, the last
    group's size (row blocks not a multiple of the group), and the grid's unused row blocks."""
    import triton
    import triton.language as tl

    from mixcompile_plugins.triton.grouped import Groups

    @triton.jit
    def order(offsets_ptr, out_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr):
        expert, start, end, pid_n = _tile(offsets_ptr, E, N, BLOCK_M, BLOCK_N, E_POW2)
        pid = tl.program_id(0)
        tl.store(out_ptr + 3 * pid, tl.where(expert < E, start, -1))
        tl.store(out_ptr + 3 * pid + 1, tl.where(expert < E, end, -1))
        tl.store(out_ptr + 3 * pid + 2, pid_n)

    block_m, block_n, e = 4, 16, len(rows)
    offsets = torch.tensor([0, *rows], device=DEVICE).cumsum(0).to(torch.int32)
    groups = Groups(offsets, None, int(offsets[-1]))
    n = columns * block_n - 3
    (programs,) = groups.grid(n)({"BLOCK_M": block_m, "BLOCK_N": block_n})
    out = torch.full((programs, 3), -2, dtype=torch.int32, device=DEVICE)
    order[(programs,)](
        offsets, out, e, n, BLOCK_M=block_m, BLOCK_N=block_n, E_POW2=max(2, triton.next_power_of_2(e))
    )
    got = sorted(tuple(t) for t in out.tolist() if t[0] >= 0)
    want = sorted(
        (start, hi, col)  # the block's first row and its expert's end
        for lo, hi in zip(offsets.tolist(), offsets.tolist()[1:], strict=False)
        for start in range(lo, hi, block_m)
        for col in range(columns)
    )
    assert got == want


def test_offsets_past_2_31_elements_are_int64():
    """The offset arithmetic the kernels use where a product of sizes passes 2^31 elements (MoT's
    ``[E, R, d]`` rows, strided group members, the routing-weight partial sums): int32 would wrap."""
    import triton
    import triton.language as tl

    @triton.jit
    def offsets(out_ptr, r, R, D, s_g, pid_n, P):
        i = tl.arange(0, 4)
        tl.store(out_ptr + i, _expert_rows(i + 61, r, R, D))
        tl.store(out_ptr + 4 + i, _members(r, i + 13, s_g))
        tl.store(out_ptr + 8 + i, _partial_offsets(pid_n, P, i))

    r, rows, d, s_g, pid_n, pairs = 5, 16384, 4096, 2**28, 223, 9_700_000
    out = torch.full((12,), -1, dtype=torch.int64, device=DEVICE)
    offsets[(1,)](out, r, rows, d, s_g, pid_n, pairs)
    want = [(e * rows + r) * d for e in range(61, 65)]
    want += [r + g * s_g for g in range(13, 17)] + [pid_n * pairs + i for i in range(4)]
    assert min(want) > 2**31
    assert out.tolist() == want


def _autotuned():
    from mixcompile_plugins.triton import grouped, tuning

    return [k for k in vars(grouped).values() if isinstance(k, tuning.Autotuner)]


TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def test_autotune_keys_cover_every_compile_time_flag():
    """A tuned config is reused only by launches that compile the same kernel (flags, precision, E_POW2):
    a config one variant can run must not be reused by another that cannot (or that runs slower with it)."""
    import inspect

    tuners = _autotuned()
    assert len(tuners) == 4
    for tuner in tuners:
        params = inspect.signature(tuner.base_fn).parameters.values()
        flags = {p.name for p in params if "constexpr" in str(p.annotation)} - set(TILE)
        assert flags and flags <= set(tuner.keys), (tuner.base_fn.__name__, flags - set(tuner.keys))


class _FakeKernel:
    """Stands in for a JIT function: records the meta-parameters of each launch."""

    arg_names = ["x_ptr", "N", "FLAG"]

    def __init__(self) -> None:
        self.launches: list[dict] = []
        self.fn = lambda: None

    def run(self, *args, **kwargs):
        self.launches.append(kwargs)


def _tuner(
    monkeypatch, smem=lambda c, a: 0, live=lambda c, a: 0, lone_accumulator=False, arch=90, configs=None,
    flag="FLAG", tiles_expert_rows=False,
):  # fmt: skip
    """A tuner over a fake kernel ``(x_ptr, N, <flag>)`` keyed on ``N`` and the flag."""
    import triton

    from mixcompile_plugins.triton import tuning

    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 1000)
    monkeypatch.setattr(tuning, "compute_capability", lambda device: arch)
    configs = configs or [
        triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=2)
        for m, w in ((128, 8), (64, 4))
    ]
    kernel = _FakeKernel()
    kernel.arg_names = ["x_ptr", "N", flag]
    tuner = tuning.Autotuner(
        kernel, configs, ["N", flag], smem, live, None, lone_accumulator, tiles_expert_rows
    )
    tuner._do_bench = lambda call, quantiles: call() or [1.0 / tuner.nargs["x_ptr"].numel()] * 3
    # Triton's disk cache hashes the kernel's source, which the fake has not: the interpreter turns the cache
    # off, a GPU run does not (these tests failed on the H200)
    tuner.cache_results = False
    return tuner, tuner.fn


def test_autotuner_never_benchmarks_during_graph_capture(monkeypatch):
    from mixcompile_plugins.triton import tuning

    tuner, kernel = _tuner(monkeypatch)
    x = torch.zeros(3)
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    tuner.run(x, 16, FLAG=1)
    assert [k["BLOCK_M"] for k in kernel.launches] == [128]  # the first config that fits, not benchmarked
    assert not tuner.cache  # and not recorded as tuned
    monkeypatch.setattr(tuning, "_capturing", lambda: False)
    tuner.run(x, 16, FLAG=1)
    assert len(kernel.launches) == 1 + 2 + 1  # both configs benchmarked, then the run
    assert list(tuner.cache) == [tuner.tuning_key((x, 16), {"FLAG": 1})]
    tuned = tuner.cache[tuner.tuning_key((x, 16), {"FLAG": 1})]
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    kernel.launches.clear()
    tuner.run(x, 16, FLAG=1)
    assert kernel.launches == [{**tuned.all_kwargs(), "FLAG": 1}]  # under capture: the tuned config
    tuner.run(x, 16, FLAG=0)  # another variant: not tuned yet, so the default again
    assert kernel.launches[-1]["BLOCK_M"] == 128 and len(tuner.cache) == 1


def test_a_tuned_key_launches_without_tritons_autotuner_run(monkeypatch):
    """Once a key is tuned, its launches skip Triton's ``Autotuner.run`` (host time at decode sizes) with
    the same config; a new flag value, a new dtype, or a cleared cache goes through it again."""
    import triton

    tuner, kernel = _tuner(monkeypatch)
    base_runs: list[tuple] = []
    base_run = triton.runtime.Autotuner.run

    def counted(self, *args, **kwargs):
        base_runs.append(args)
        return base_run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.Autotuner, "run", counted)
    x = torch.zeros(3)
    tuner.run(x, 16, FLAG=1, grid=(1,))
    tuned = tuner.cache[tuner.tuning_key((x, 16), {"FLAG": 1})]
    assert len(base_runs) == 1 and len(kernel.launches) == 2 + 1  # two configs benchmarked, then the run
    kernel.launches.clear()
    tuner.run(torch.ones(3), 16, FLAG=1, grid=(2,))
    assert len(base_runs) == 1  # the fast path
    assert kernel.launches == [{"FLAG": 1, "grid": (2,), **tuned.all_kwargs()}]
    for args, flag in (((x, 32), 1), ((x, 16), 0), ((x.half(), 16), 1)):  # key, flag, dtype
        tuner.run(*args, FLAG=flag)
        tuner.run(*args, FLAG=flag)
    assert len(base_runs) == 1 + 3 and len(tuner.cache) == 4
    tuner.cache.clear()
    tuner.run(x, 16, FLAG=1)
    assert len(base_runs) == 5 and len(tuner.cache) == 1  # tuned again


def test_autotuner_prunes_what_does_not_fit(monkeypatch):
    x = torch.zeros(3)
    tuner, kernel = _tuner(monkeypatch, smem=lambda c, a: 10 * c.kwargs["BLOCK_M"])  # 1280 B > 1000 B
    tuner.run(x, 16, FLAG=1)
    assert {k["BLOCK_M"] for k in kernel.launches} == {64}
    tuner, kernel = _tuner(monkeypatch, live=lambda c, a: 97 if c.num_warps == 4 else 96)
    tuner.run(x, 16, FLAG=1)
    assert {k["BLOCK_M"] for k in kernel.launches} == {128}
    tuner, kernel = _tuner(monkeypatch, smem=lambda c, a: 1001)
    with pytest.raises(RuntimeError, match="no config fits 1000 bytes of shared memory and 96 live"):
        tuner.run(x, 16, FLAG=1)


@pytest.mark.parametrize(
    "lone_accumulator,arch,kept",
    [(True, 90, {128, 64}), (True, 100, {128, 64}), (True, 80, {64}), (True, 89, {64}), (False, 90, {64})],
)
def test_a_lone_accumulator_may_hold_more_values_where_wgmma_runs(monkeypatch, lone_accumulator, arch, kept):
    """128 values per thread (a 128 x 256 tile at 8 warps) only for a kernel whose live values are one
    accumulator, and only on sm_90 and later (wgmma keeps both operands in shared memory); 129 never."""
    x = torch.zeros(3)
    live = lambda c, a: 128 if c.num_warps == 8 else 96  # noqa: E731
    tuner, kernel = _tuner(monkeypatch, live=live, lone_accumulator=lone_accumulator, arch=arch)
    tuner.run(x, 16, FLAG=1)
    assert {k["BLOCK_M"] for k in kernel.launches} == kept
    tuner, kernel = _tuner(monkeypatch, live=lambda c, a: 129, lone_accumulator=True)
    with pytest.raises(RuntimeError, match="and 128 live values per thread"):
        tuner.run(x, 16, FLAG=1)


@pytest.mark.parametrize(
    "arch,precision,kept",
    [(80, "tf32x3", {32}), (89, "tf32x3", {32}), (90, "tf32x3", {64, 32}), (80, "tf32", {64, 32})],
)
def test_three_product_dots_take_a_narrow_k_tile_before_hopper(monkeypatch, arch, precision, kept):
    """Without wgmma, three-product fp32 dots hold their split operands in registers: BLOCK_K > 32 spilled
    on sm_80, so only narrower K tiles are tried there; other precisions and sm_90 keep both."""
    import triton

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": 64, "BLOCK_K": k}, num_warps=4, num_stages=2)
        for m, k in ((64, 64), (32, 32))
    ]
    tuner, kernel = _tuner(monkeypatch, arch=arch, configs=configs, flag="PRECISION")
    tuner.run(torch.zeros(3), 16, PRECISION=precision)
    assert {k["BLOCK_K"] for k in kernel.launches} == kept


@pytest.mark.parametrize("rows,tried", [(4096, [128, 64, 32]), (64, [64, 32, 128]), (1, [32, 64, 128])])
def test_few_rows_per_expert_try_the_shortest_row_blocks_first(monkeypatch, rows, tried):
    """A kernel whose BLOCK_M blocks each expert's rows (ROWS_HINT of them) tries blocks no taller than that
    first, then the taller ones shortest first; the config budget keeps the first of them."""
    import triton

    from mixcompile_plugins.triton import tuning

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=2) for m in (128, 64, 32)]
    tuner, _ = _tuner(monkeypatch, configs=configs, flag="ROWS_HINT", tiles_expert_rows=True)
    args = {"x_ptr": torch.zeros(3), "N": 16}
    assert [c.kwargs["BLOCK_M"] for c in tuner._fitting(configs, args, ROWS_HINT=rows)] == tried
    monkeypatch.setattr(tuning, "MAX_CONFIGS", 1)
    assert [c.kwargs["BLOCK_M"] for c in tuner._fitting(configs, args, ROWS_HINT=rows)] == tried[:1]


class _Launches:
    """Counts Triton kernel launches, and ATen ops (from the profiler, nested ones included)."""

    def __init__(self, monkeypatch) -> None:
        from mixcompile_plugins.triton import grouped, moe_kernels

        self.triton: list[str] = []
        for jit in {type(grouped._up_kernel.fn), type(moe_kernels._combine_kernel)}:
            monkeypatch.setattr(jit, "run", self._counted(jit.run))

    def _counted(self, run):
        def counted(fn, *args, **kwargs):
            self.triton.append(fn.__name__)
            return run(fn, *args, **kwargs)

        return counted

    def __call__(self, step) -> tuple[list[str], list[str]]:
        """``(aten op names, Triton kernel names)`` of ``step()``."""
        self.triton.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        return [e.name for e in prof.events() if e.name.startswith("aten::")], list(self.triton)


@pytest.mark.parametrize("pairs_per_token", [True, False])
@pytest.mark.parametrize("tokens", [13, 1100])
def test_routing_is_sorted_once_per_training_step(monkeypatch, pairs_per_token, tokens):
    """The forward sorts the pairs by expert with a counting sort (one launch where the pairs fit one chunk,
    histograms, a cumsum and the placement otherwise; no argsort, no searchsorted); a plan without
    pairs_per_token also counts them by token (each token's ranks, a cumsum, the listing). The backward
    reuses that (saved) routing."""
    from mixcompile_plugins.triton import ops

    x, plan, experts, _ = moe_op_args(n=tokens)
    if not pairs_per_token:
        plan = dataclasses.replace(plan, pairs_per_token=None)
    if DEVICE == "cuda":  # a first call at new sizes tunes there (each config launched, timed): not counted
        ops.moe(x, plan, experts).sum().backward()
    count = _Launches(monkeypatch)
    out = []
    forward = count(lambda: out.append(ops.moe(x, plan, experts)))
    backward = count(lambda: out[0].backward(torch.ones_like(out[0])))
    sorting = ("aten::sort", "aten::searchsorted", "aten::cumsum", "aten::cumsum_")
    by_token = [] if pairs_per_token else ["aten::cumsum_"]  # each token's first slot
    by_expert = ["aten::cumsum_"] if tokens > 1024 else []  # 4 experts: chunks of 2048 pairs
    assert sorted(op for op in forward[0] if op in sorting) == sorted(by_token + by_expert)
    assert not [op for op in backward[0] if op in sorting]
    sort = ["_expert_counts_kernel", "_place_kernel"] if by_expert else ["_place_kernel"]
    if not pairs_per_token:
        sort += ["_token_ranks_kernel", "_list_by_token_kernel"]
    assert forward[1] == [*sort, "_up_kernel", "_mm_kernel", "_combine_kernel"]
    kernels = [
        "_up_backward_kernel",
        "_scaled_rows_kernel",
        "_wgrad_kernel",
        "_wgrad_kernel",
        "_wgrad_kernel",
    ]
    kernels.append("_mm_kernel")
    assert sorted(backward[1]) == sorted([*kernels, "_combine_kernel"])


# How transformers stores a gated experts module's weights (``gate_up_proj``, ``down_proj``): the leaf
# tensor's shape, the view that makes it ``[E, 2h, d]`` / ``[E, d, h]``, how the gate and up halves are
# taken, and whether the kernels read the halves in place (a contiguous row or column) or need a copy.
GATE_UP_LAYOUTS = {
    "concatenated": (False, lambda t, h: (t[:, :h], t[:, h:]), True),
    "interleaved": (False, lambda t, h: (t[:, 0::2], t[:, 1::2]), True),
    "transposed": (True, lambda t, h: (t[:, :h], t[:, h:]), True),
    "transposed_interleaved": (True, lambda t, h: (t[:, 0::2], t[:, 1::2]), False),
}


@pytest.mark.parametrize("layout", GATE_UP_LAYOUTS)
def test_strided_expert_weights_are_read_in_place(monkeypatch, layout):
    """Weights given as views (the halves of a fused gate-up tensor, transposed stacks) give the same output
    and gradients as the torch kernel, and the kernels read them where they are, with no per-call copy."""
    from mixcompile.integrations.transformers_experts import ExpertsView
    from mixcompile_plugins.triton import ops

    e, d, h, n = 4, 24, 40, 13
    transposed, split, in_place = GATE_UP_LAYOUTS[layout]
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn((e, d, 2 * h) if transposed else (e, 2 * h, d), generator=g) / 5).to(DEVICE)
    down = (torch.randn((e, h, d) if transposed else (e, d, h), generator=g) / 6).to(DEVICE)
    x = torch.randn(n, d, generator=g).to(DEVICE)
    plan = topk_plan(n, e, 2)
    packed = []
    monkeypatch.setattr(ops, "_packed", lambda *t, f=ops._packed: packed.append(f(*t)) or packed[-1])

    def run(kernel):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up, down, plan.weight)]
        x_, gate_up_, down_, weight = leaves
        w_up, w_out = (gate_up_.mT, down_.mT) if transposed else (gate_up_, down_)
        w_gate, w_in = split(w_up, h)
        experts = ExpertsView(w_in, w_gate, w_out, None, None, None, "silu")
        routed = RoutingPlan(plan.token_index, plan.expert_index, weight, n, e)
        y = kernel.moe(x_, routed, experts)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y))
        return y, [t.grad for t in leaves], (w_in, w_gate, w_out)

    y_ref, grads_ref, _ = run(torch_kernel())
    y, grads, views = run(triton_kernel())
    assert_close(y, y_ref, what="output")
    for name, got, want in zip(["x", "gate_up", "down", "weight"], grads, grads_ref, strict=True):
        assert_close(got, want, what=f"grad {name}")
    forward = packed[0]  # the forward op's; the backward op packs again
    assert forward.w_out.data_ptr() == views[2].data_ptr()  # down_proj, plain or transposed: in place
    read_in_place = [
        forward.w_in.data_ptr() == views[0].data_ptr(),
        forward.w_gate.data_ptr() == views[1].data_ptr(),
    ]
    assert read_in_place == [in_place, in_place]


def test_paired_weights_with_different_strides_are_refused():
    from mixcompile_plugins.triton.grouped import _check_shared_strides

    w = torch.zeros(2, 3, 4)
    _check_shared_strides(w, w.clone())
    with pytest.raises(ValueError, match="equal strides"):
        _check_shared_strides(w, torch.zeros(2, 4, 3).mT)


def test_eager_calls_skip_the_custom_ops_dispatch(monkeypatch):
    """Eager forwards and backwards run the kernels without the custom ops' dispatch (host time at decode
    sizes), and compute what the ops compute; torch.compile goes through the ops (tested above)."""
    from mixcompile_plugins.triton import ops

    names = ("moe_forward_op", "moe_backward_op", "mot_forward_op", "mot_backward_op", "topk_route_op")
    ops_outputs = {}
    x, plan, experts, tensors = moe_op_args(n=13)
    args = (x, plan.token_index, plan.expert_index, plan.weight, *tensors, "gelu", True, 2)
    ops_outputs["moe"] = ops.moe_forward_op(*args)[0]
    used = []
    for name in names:
        monkeypatch.setattr(ops, name, lambda *a, name=name: used.append(name))
    y = ops.moe(x, plan, experts)
    y.backward(torch.ones_like(y))
    x_g = torch.randn(3, 2, 4, 24, device=DEVICE, requires_grad=True)
    merge = torch.softmax(torch.randn(3, 2, 4, 4, device=DEVICE), dim=2).requires_grad_()
    y_g = ops.mot(x_g, MixPlan(merge, merge), experts)
    y_g.sum().backward()
    ops.fused_topk_route(torch.randn(5, 4, device=DEVICE, requires_grad=True), None, 2, True)[
        2
    ].sum().backward()
    assert used == []
    assert_close(y, ops_outputs["moe"], what="eager against the op")
    assert x.grad is not None and torch.isfinite(x.grad).all() and x_g.grad is not None
