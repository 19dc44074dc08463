"""``torch.compile`` on MoE / MoT blocks: whole graphs wherever routing has static shapes, and compiled
outputs, gradients and statistics equal to eager ones (fresh random inputs).

Without a GPU the Triton kernels run in Triton's CPU interpreter. As in ``test_triton_kernels.py``, this
module imports ``triton`` with ``TRITON_INTERPRET=1`` set, then restores the environment; the ``triton_env``
fixture sets it again only while this module's tests run. ``torch._dynamo.testing`` imports ``triton`` too,
so it is imported only inside tests. The ``aot_eager`` backend runs Dynamo and AOTAutograd (what decides
graph breaks and traces the backward) without Inductor's C++ compile time.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from reference import rel_err
from triton_setup import import_triton

import mixcompile as mc
from mixcompile import build_tiny_gpt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5  # fp32, relative


NO_TRITON = import_triton(DEVICE)
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
KERNELS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(scope="module", autouse=True)
def triton_env():
    """``kernel="triton"`` supports CPU tensors only while ``TRITON_INTERPRET`` is set."""
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (compile counts are per test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counted_compile(module: torch.nn.Module, **options) -> tuple[torch.nn.Module, Any]:
    """``torch.compile`` with ``aot_eager``, and the counter of the graphs it compiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(module, backend=counter, **options), counter


def run(module, x):
    """Output, input and parameter gradients (aux loss included), buffers and stats of ``module`` (compiled or
    not) on ``x``; names as in the eager module."""
    base = getattr(module, "_orig_mod", module)
    x = x.clone().requires_grad_(x.is_floating_point())
    y = module(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    loss = (y * cotangent).sum() + mc.aux_loss(base)
    names, params = zip(*base.named_parameters(), strict=True)
    if x.requires_grad:
        names, params = ("x", *names), (x, *params)
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True), strict=True))
    buffers = {name: b.clone() for name, b in base.named_buffers()}
    return y.detach(), grads, buffers, mc.stats(base)


def assert_same(got, want, what=""):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            assert_same(got[key], want[key], f"{what}/{key}")
    elif isinstance(want, tuple):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{what}[{i}]")
    elif want is None:
        assert got is None, what
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, what
        if want.is_floating_point():
            assert rel_err(got, want) < TOL, f"{what}: relative error {rel_err(got, want):.2e}"
        else:
            assert torch.equal(got, want), what
    elif isinstance(want, float):
        assert type(got) is float and got == pytest.approx(want, rel=TOL, abs=1e-7), what
    else:
        assert type(got) is type(want) and got == want, what


def check_against_eager(module, inputs, fullgraph=True, **options):
    """Compiled vs an eager copy on each input; what the first input compiled serves all the others."""
    eager = copy.deepcopy(module)
    compiled, counter = counted_compile(module, fullgraph=fullgraph, **options)
    first, *others = inputs
    assert_same(run(compiled, first), run(eager, first))
    graphs = counter.frame_count
    for x in others:
        assert_same(run(compiled, x), run(eager, x))
    assert counter.frame_count == graphs, "recompiled"
    return module


SHARP = {"init_std": 0.5}  # a router far from uniform, so routing changes with every input
MOE_CASES = {
    "topk": {"top_k": 2, "router_options": SHARP},
    "topk_gated_bias_shared": {
        "top_k": 2, "gated": True, "bias": True, "num_shared_experts": 1, "router_options": SHARP,
    },
    "topk_softmax_bias_balancing": {
        "top_k": 2, "router_options": {"order": "topk_softmax", "bias_balancing": True, **SHARP},
    },
    "expert_choice": {"top_k": 2, "router": "expert_choice", "gated": True, "router_options": SHARP},
    "hash_top1": {"top_k": 1, "router": "hash", "activation": "silu"},
}  # fmt: skip


def moe_block(kernel: str, case: dict) -> mc.MoEBlock:
    torch.manual_seed(0)
    return mc.MoEBlock(16, 32, 4, kernel=kernel, device=DEVICE, **case)


def inputs(*shape: int, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn(*shape, device=DEVICE) for _ in range(count)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_block_compiles_whole(kernel, case):
    block = check_against_eager(moe_block(kernel, MOE_CASES[case]), inputs(2, 5, 16))
    assert block.last_stats["kernel"] == kernel


MOT_CASES = {
    "soft_incomplete_group": ({"group_size": 2}, (3, 5, 16)),
    "gated_bias_emit_experts": (
        {"group_size": 3, "gated": True, "bias": True, "mixer_options": {"emit": "experts"}},
        (6, 4, 16),
    ),
    "sparse_sequence_first": ({"group_size": 2, "mode": "sparse", "layout": "seq_first"}, (5, 4, 16)),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", MOT_CASES)
def test_mot_block_compiles_whole(kernel, case):
    options, shape = MOT_CASES[case]
    torch.manual_seed(0)
    options = {**options, "mixer_options": {**SHARP, **options.get("mixer_options", {})}}
    block = mc.MoTBlock(16, 32, 4, kernel=kernel, device=DEVICE, **options)
    check_against_eager(block, inputs(*shape))


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("moe", marks=needs_triton),
        "moe_torch",
        pytest.param("mot", marks=needs_triton),
        "mot_torch",
    ],
)
def test_dynamic_shapes_compile_once(kind):
    """Batch and sequence sizes symbolic: one graph for every size."""
    if kind.startswith("moe"):
        kernel = "torch" if kind == "moe_torch" else "triton"
        block, shapes = moe_block(kernel, MOE_CASES["topk_gated_bias_shared"]), [(2, 5, 16), (3, 7, 16)]
    else:
        torch.manual_seed(0)
        kernel = "torch" if kind == "mot_torch" else "triton"
        block = mc.MoTBlock(16, 32, 4, group_size=2, kernel=kernel, device=DEVICE)
        shapes = [(3, 5, 16), (5, 3, 16)]  # both with an incomplete group: the padding is one more branch
    check_against_eager(block, [torch.randn(*s, device=DEVICE) for s in shapes], dynamic=True)


@needs_triton
def test_capacity_limits_compile_whole_with_dynamic_output_shapes():
    """Dropped pairs make the plan's length data-dependent: whole graphs once Dynamo may trace such shapes."""
    block = moe_block("triton", {"top_k": 2, "router_options": {"capacity_factor": 0.75, **SHARP}})
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        check_against_eager(block, inputs(2, 8, 16))
    assert block.last_stats["dropped_assignments"] > 0


def test_capacity_limits_compile_whole_on_the_torch_kernel():
    """Dropped pairs make the plan's length data-dependent; the README says this torch traces it whole."""
    block = moe_block("torch", {"top_k": 2, "router_options": {"capacity_factor": 0.75, **SHARP}})
    check_against_eager(block, inputs(2, 8, 16))
    assert block.last_stats["dropped_assignments"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_kernel_moe_never_recompiles_when_the_load_changes(dtype):
    """The reference kernel's grouped products are one opaque op with static shapes (``torch._grouped_mm``
    in float32, a loop over experts in float64): new expert loads reuse the graph."""
    torch.set_default_dtype(dtype)
    try:
        block = moe_block("torch", MOE_CASES["topk_gated_bias_shared"])
        xs = [torch.randn(2, 5, 16, device=DEVICE) for _ in range(3)]
    finally:
        torch.set_default_dtype(torch.float32)
    loads = set()
    for x in xs:
        with torch.no_grad():  # a graph-carrying aux loss would keep the block from being deep-copied
            block(x)
        loads.add(tuple(block.last_stats["expert_load"].tolist()))
    assert len(loads) > 1  # the inputs really route differently
    check_against_eager(block, xs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_converted_model_compiles_whole(kernel):
    """A converted tiny GPT, MoE and MoT, fullgraph on either kernel."""
    torch.manual_seed(0)
    model = build_tiny_gpt(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq=16).to(DEVICE)
    tokens = [torch.randint(0, 256, (4, 8), device=DEVICE) for _ in range(2)]
    for options in ({"strategy": "moe", "top_k": 2}, {"strategy": "mot", "group_size": 2}):
        converted = mc.convert(model, num_experts=4, kernel=kernel, **options)
        check_against_eager(converted, tokens)
        torch._dynamo.reset()


class _NoisyRouter(mc.LearnedRouter):
    """Token choice with NaN weights (a value error) or int32 token indices (a type error)."""

    def __init__(self, *args, fault: str, **options) -> None:
        super().__init__(*args, **options)
        self.fault = fault

    def forward(self, x, kernel):
        logits = self.logits(x)
        chosen = torch.topk(logits, self.top_k, dim=-1).indices
        weights = torch.full(chosen.shape, float("nan") if self.fault == "nan" else 0.5, device=x.device)
        plan = self.token_choice_plan(logits, chosen, weights)
        if self.fault == "int32":
            plan.token_index = plan.token_index.int()
        return plan


class _FaultyPlugin:
    @mc.hookimpl
    def register_routers(self, register):
        register("noisy", _NoisyRouter)


@pytest.fixture
def faulty_router():
    name = mc.register_plugin(_FaultyPlugin(), name="faulty")
    yield
    mc.unregister_plugin(name)


def test_plugin_outputs_are_still_validated(faulty_router):
    """Tracing checks types and shapes; value checks (host syncs) are for eager forwards, NaN under the
    debug switch."""
    x = torch.randn(3, 4, device=DEVICE)
    source = r"router 'noisy' \(plugin 'faulty'\) returned a malformed RoutingPlan"
    block = mc.MoEBlock(4, 8, 3, router="noisy", router_options={"fault": "nan"}, kernel="torch")
    with mc.debug_checks():
        assert torch.compile(block, backend="aot_eager")(x).isnan().all()
        with pytest.raises(mc.PluginError, match=f"{source}: weight has NaN or inf"):
            block(x)
    block = mc.MoEBlock(4, 8, 3, router="noisy", router_options={"fault": "int32"}, kernel="torch")
    with pytest.raises(mc.PluginError, match=f"{source}: token_index must be int64"):
        torch.compile(block, backend="aot_eager")(x)


# ---- converted Hugging Face models, whole ----------------------------------------------------------------

HF_VARIANTS = {
    "topk": {"strategy": "moe", "top_k": 2},
    "switch": {"strategy": "moe", "router": "switch", "top_k": 1},
    "expert_choice": {"strategy": "moe", "router": "expert_choice", "top_k": 2},
    "hash": {"strategy": "moe", "router": "hash", "top_k": 2},
    "mot": {"strategy": "mot", "group_size": 2, "mixer": "softmax"},
}
HF_MODELS = ("llama", "gpt2", "bert", "t5")
# The default run covers every router and the mixer on the torch kernel and both strategies on Triton;
# `pytest -m zoo_full` runs every model with every variant on both kernels.
HF_DEFAULT = {
    ("torch", "llama", "topk"),
    ("torch", "gpt2", "switch"),
    ("torch", "bert", "expert_choice"),
    ("torch", "t5", "hash"),
    ("torch", "gpt2", "mot"),
    ("torch", "bert", "mot"),
    ("triton", "llama", "topk"),
    ("triton", "t5", "mot"),
}


class _Logits(torch.nn.Module):
    """A Hugging Face model as ``ids -> logits``, called with a right-padded attention mask (and decoder
    ids for T5), so MoT blocks see padding through the model's own hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        extra = {"decoder_input_ids": ids.flip(-1)} if self.model.config.is_encoder_decoder else {}
        output = self.model(input_ids=ids, attention_mask=mask, **extra)
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _hf_cases():
    for kernel in ("torch", "triton"):
        for model in HF_MODELS:
            for variant in HF_VARIANTS:
                marks = [needs_triton] if kernel == "triton" else []
                if (kernel, model, variant) not in HF_DEFAULT:
                    marks.append(pytest.mark.zoo_full)
                yield pytest.param(kernel, model, variant, marks=marks, id=f"{kernel}-{model}-{variant}")


@pytest.mark.parametrize("kernel,name,variant", list(_hf_cases()))
def test_converted_hugging_face_model_compiles_whole(kernel, name, variant):
    """``fullgraph=True`` with default options: outputs, gradients, buffers and statistics equal eager."""
    from zoo import build

    torch.manual_seed(0)
    converted = mc.convert(build(name), num_experts=4, kernel=kernel, **HF_VARIANTS[variant])
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (4, 6), generator=generator).to(DEVICE) for _ in range(2)]
    check_against_eager(_Logits(converted.to(DEVICE)).train(), ids)


@pytest.mark.parametrize(
    "name,options",
    [("llama", {}), ("bert", {"strategy": "mot", "group_size": 2})],
    ids=["llama-moe", "bert-mot"],
)
def test_default_options_compile_whole(name, options, monkeypatch):
    """``convert(model)`` with no kernel named (``kernel="auto"``, the issue's 7 graph breaks in a 2-layer
    LLaMA): ``fullgraph=True`` traces the model whole, compiled equal to eager, on the kernel auto chose."""
    from zoo import build

    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")  # auto as a user gets it on the CPU (not Triton's interpreter)
    torch.manual_seed(0)
    converted = mc.convert(build(name), num_experts=4, **options).to(DEVICE)
    blocks = list(mc.sparse_blocks(converted).values())
    assert blocks and all(block.kernel == "auto" for block in blocks)
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (4, 6), generator=generator).to(DEVICE) for _ in range(2)]
    check_against_eager(_Logits(converted).train(), ids)
    expected = "triton" if DEVICE == "cuda" else "torch"
    assert {stats["kernel"] for stats in mc.stats(converted).values()} == {expected}


def test_kernels_are_chosen_when_blocks_are_built_or_moved_never_in_a_forward(monkeypatch):
    """Kernel resolution (a registry walk torch.compile cannot trace) runs when a block is built, moved or
    cast, or its ``kernel`` is set; a forward in any floating dtype on its device only looks it up."""
    from mixcompile.runtime.blocks import base

    calls: list[tuple[str, torch.dtype]] = []
    resolve = base.resolve_kernel

    def counting(name, kind, device, dtype, **options):
        calls.append((device.type, dtype))
        return resolve(name, kind, device, dtype, **options)

    monkeypatch.setattr(base, "resolve_kernel", counting)
    moe = mc.MoEBlock(16, 32, 4, top_k=2, hidden_dropout=0.1)
    mot = mc.MoTBlock(16, 32, 4, group_size=2)
    assert calls  # chosen when built
    for block in (moe, mot):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            calls.clear()
            block.to(dtype)
            assert calls  # chosen again when cast
            calls.clear()
            block.train()(torch.randn(2, 3, 16, dtype=dtype))
            block.eval()(torch.randn(2, 3, 16, dtype=dtype))
            assert calls == [], f"{type(block).__name__} resolved a kernel in a {dtype} forward"
    calls.clear()
    moe.kernel = "torch"
    assert calls and moe.kernel == "torch"
    with pytest.raises(mc.UnknownNameError, match="tritn"):
        moe.kernel = "tritn"
