"""Every plugin fault gets a PluginError or ConfigError naming the plugin and the site, on every call:
wrong options, a crash inside the plugin's own code, a malformed output; NaN under the debug switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixcompile as mc
import mixcompile.errors
from mixcompile.plugins.build import accepted_options


class _Router(mc.LearnedRouter):
    """Top-k routing that misbehaves on demand: ``fault`` set after construction picks how."""

    def __init__(self, *args, explode_in_init: bool = False, **options) -> None:
        super().__init__(*args, **options)
        if explode_in_init:
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")  # a bug, not an option
        self.fault = ""

    def forward(self, x, kernel):
        logits = self.logits(x)
        probs, chosen, weights = kernel.topk_routing(logits, self.top_k, bias=None, renormalize=True)
        if self.fault == "crash":
            raise IndexError("index 7 is out of bounds")
        if self.fault == "nan":
            weights = weights * float("nan")
        if self.fault == "picks_written":  # the kernel's picks, changed in place before they are listed
            chosen[0, 0] = self.num_experts
        if self.fault == "own_picks":  # picks of its own, listed by the same helper
            chosen = torch.full_like(chosen, self.num_experts)
        plan = self.token_choice_plan(logits, chosen, weights, probs)
        if self.fault == "range":
            plan.expert_index = plan.expert_index + self.num_experts
        if self.fault == "plan_written":  # the listed plan, changed in place
            plan.token_index[-1] = x.shape[0]
        if self.fault == "misordered":  # still declares pairs_per_token, but not token by token any more
            plan.token_index = plan.token_index.flip(0)
        if self.fault == "miscounted":  # a dropped pair with pairs_per_token still declared
            plan.token_index, plan.expert_index = plan.token_index[1:], plan.expert_index[1:]
            plan.weight = plan.weight[1:]
        return plan


class _Kernel(mc.Kernel):
    priority = -1
    fault = ""

    def supports(self, kind, device, dtype):
        return True

    def topk_routing(self, logits, top_k, *, bias=None, renormalize=True):
        probs, experts, weights = super().topk_routing(logits, top_k, bias=bias, renormalize=renormalize)
        return probs, experts + 1 if self.fault == "off_by_one" else experts, weights

    def moe(self, x, plan, experts):
        if self.fault == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        y = mc.registry().get("kernel", "torch").factory().moe(x, plan, experts)
        return y * float("nan") if self.fault == "nan" else y


def _initializer(experts, dense, *, generator=None, scale: float = 1.0) -> None:
    if scale < 0:
        raise mc.ConfigError(f"scale must be >= 0, got {scale}")
    experts.w_in.fill_(1 / scale)  # scale=0 divides by zero: a bug inside the plugin


class _Plugin:
    @mc.hookimpl
    def register_routers(self, register):
        register("flaky", _Router)

    @mc.hookimpl
    def register_kernels(self, register):
        register("flaky", _Kernel)

    @mc.hookimpl
    def register_initializers(self, register):
        register("flaky", _initializer)


@pytest.fixture
def flaky():
    mc.register_plugin(_Plugin(), name="flaky_plugin")
    yield
    mc.unregister_plugin("flaky_plugin")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x):
        return x + self.mlp(x)


def _site_model(**recipe):
    return mc.convert(_Net(), strategy="moe", num_experts=4, top_k=2, **recipe)


def test_a_misspelt_option_names_the_plugin_and_suggests(flaky) -> None:
    with pytest.raises(
        mc.ConfigError,
        match=r"router 'topk' \(plugin 'mixcompile_plugins.routers'\).*"
        r"no option 'capacity'\. Did you mean 'capacity_factor'\?",
    ):
        mc.MoEBlock(8, 16, 4, router_options={"capacity": 1.0})
    with pytest.raises(mc.ConfigError, match=r"mixer 'softmax'.*no option 'temprature'.*'temperature'"):
        mc.MoTBlock(8, 16, 4, group_size=2, mixer_options={"temprature": 1.0})
    with pytest.raises(
        mc.ConfigError, match=r"initializer 'flaky' \(plugin 'flaky_plugin'\).*no option 'scal'"
    ):
        _site_model(init="flaky", init_options={"scal": 2.0})


def test_a_bad_option_value_keeps_the_plugins_own_message(flaky) -> None:
    with pytest.raises(mc.ConfigError, match=r"FFN site 0: initializer 'flaky'.* at mlp: scale must be >= 0"):
        _site_model(init="flaky", init_options={"scale": -1.0})


def test_a_crash_inside_a_plugin_is_its_bug_not_a_wrong_option(flaky) -> None:
    with pytest.raises(
        mc.PluginError,
        match=r"router 'flaky' \(plugin 'flaky_plugin'\) crashed while being built: "
        r"TypeError: unsupported operand.*bug in the plugin",
    ):
        mc.MoEBlock(8, 16, 4, router="flaky", router_options={"explode_in_init": True})
    with pytest.raises(mc.PluginError, match=r"initializer 'flaky' .* crashed.*ZeroDivisionError"):
        _site_model(init="flaky", init_options={"scale": 0.0})


def _block(router: str = "flaky", kernel: str = "torch") -> mc.MoEBlock:
    return _site_model(router=router, kernel=kernel, init="random").mlp


@pytest.mark.parametrize(
    "fault, error, fragment",
    [
        ("crash", mc.PluginError, r" crashed: IndexError: index 7"),
        ("range", mc.PluginError, r" returned a malformed RoutingPlan: .*expert_index outside \[0, 4\)"),
        ("plan_written", mc.PluginError, r" returned a malformed RoutingPlan: token_index outside \[0, 5\)"),
        ("misordered", mc.PluginError, r" returned a malformed .*: pairs_per_token=2 says token t's pairs"),
        ("miscounted", mc.PluginError, r" returned a malformed .*: pairs_per_token=2 with 5 tokens means 10"),
    ],
)
def test_router_faults_name_the_plugin_and_site_on_every_call(flaky, fault, error, fragment) -> None:
    block = _block()
    x = torch.randn(5, 8)
    block(x)  # a good first call: the checks must not stop after it
    block.router.fault = fault
    for _ in range(2):
        with pytest.raises(error, match=r"router 'flaky' \(plugin 'flaky_plugin'\) at mlp" + fragment):
            block(x)


def test_kernel_faults_name_the_kernel_and_site(flaky) -> None:
    block = _block(router="topk", kernel="flaky")
    x = torch.randn(5, 8)
    block(x)
    _Kernel.fault = "crash"
    try:
        with pytest.raises(
            mc.PluginError,
            match=r"kernel 'flaky' \(plugin 'flaky_plugin'\) at mlp crashed: "
            r"RuntimeError: CUDA error",
        ):
            block(x)
        _Kernel.fault = "nan"
        block(x)  # NaN is only looked for under the debug switch (a full pass over the output)
        with mc.debug_checks(), pytest.raises(mc.PluginError, match=r"kernel 'flaky'.* at mlp returned NaN"):
            block(x)
        _Kernel.fault = "oom"  # not a bug in the kernel: it stays what batch-size finders catch by type
        with pytest.raises(torch.OutOfMemoryError) as caught:
            block(x)
        assert not isinstance(caught.value, mc.MixcompileError)
    finally:
        _Kernel.fault = ""


@pytest.mark.parametrize("init", ["upcycle", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_conversion_whose_block_computes_nan_is_refused_naming_its_plugins(flaky, init, dtype) -> None:
    """convert ran the block on its probe and, unless it should reproduce the dense FFN, never looked at the
    values: a model computing NaN everywhere was reported converted (and the command line wrote it)."""
    _Kernel.fault = "nan"
    try:
        with pytest.raises(
            mc.PluginError,
            match=r"FFN site 0 at 'mlp': the block built for it returned NaN or inf at 48 of 48 values where "
            r"the dense FFN's are finite, .*\(router 'topk', kernel 'flaky', or the initializer\)",
        ):
            mc.convert(_Net().to(dtype), strategy="moe", num_experts=4, top_k=2, kernel="flaky", init=init)
    finally:
        _Kernel.fault = ""


def test_a_probe_holding_nan_is_not_blamed_on_the_plugins() -> None:
    """A NaN in one position of the FFN's input (a fully masked row's attention output): the MoT block's
    mixing spreads it to the row's group-mates, where the dense FFN keeps it to its row."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

        def forward(self, x):
            x = x.clone()
            x[-1, -1] = float("nan")
            return x + self.mlp(x)

    mc.convert(Net(), strategy="mot", num_experts=4, group_size=2, example_inputs=torch.randn(2, 3, 8))


@pytest.mark.parametrize("training", [True, False])
def test_a_third_party_kernels_picks_out_of_range_name_the_kernel(flaky, training) -> None:
    """Listed as they came out by a built-in router, they were taken as in range by construction: the
    block failed in its statistics (eval) or blamed the built-in router (training)."""
    block = _block(router="topk", kernel="flaky").train(training)
    _Kernel.fault = "off_by_one"
    try:
        with pytest.raises(
            mc.PluginError,
            match=r"kernel 'flaky' \(plugin 'flaky_plugin'\) at mlp: topk_routing returned experts from 1 to "
            r"4; expected indices in \[0, 4\)",
        ):
            block(torch.randn(64, 8))
    finally:
        _Kernel.fault = ""


def test_a_router_returning_something_else_than_a_plan_is_told_so(flaky) -> None:
    block = _block()
    block.router.forward = lambda x, kernel: x  # a tensor, not a RoutingPlan
    with pytest.raises(
        mc.PluginError, match=r"router 'flaky' .* returned a malformed RoutingPlan: expected a"
    ):
        block(torch.randn(5, 8))


def test_nan_from_a_router_is_found_under_the_debug_switch(flaky) -> None:
    block = _block()
    block.router.fault = "nan"
    assert block(torch.randn(5, 8)).isnan().all()  # off: NaN flows on, as through any torch layer
    with mc.debug_checks(), pytest.raises(mc.PluginError, match=r"router 'flaky'.* at mlp .*weight has NaN"):
        block(torch.randn(5, 8))


def test_a_nan_input_is_blamed_on_upstream_not_the_router() -> None:
    block = _block(router="topk")
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    with (
        mc.debug_checks(),
        pytest.raises(mc.ShapeError, match=r"input of the block at mlp has NaN.*before the block"),
    ):
        block(x)


def test_errors_keep_their_type_and_fields_when_given_context() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    with pytest.raises(mc.UnknownNameError) as raised:
        mc.convert(model, strategy="moe", router="topp")
    error = raised.value
    assert (error.kind, error.name, error.suggestion) == ("router", "topp", "topk")
    assert "topk" in error.known and "FFN site 0" in str(error)


def test_every_public_exception_is_exported() -> None:
    errors = {
        name
        for name, value in vars(mixcompile.errors).items()
        if isinstance(value, type) and issubclass(value, Exception) and not name.startswith("_")
    }
    assert errors <= set(mc.__all__), errors - set(mc.__all__)


def test_accepted_options_follow_kwargs_up_the_class_chain() -> None:
    topk = mc.registry().get("router", "topk").factory
    assert {"order", "capacity_factor", "jitter", "balance_loss_weight"} <= accepted_options(topk)
    assert accepted_options(lambda **anything: None) is None


def test_the_check_cost_benchmark_runs() -> None:
    """``benchmarks/bench_checks.py`` measures what these checks cost; its smoke run keeps working."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_checks.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("MoE", "MoT"))]
    assert len(rows) == 2 and all(line.count("%") == 2 for line in rows), done.stdout


@pytest.mark.parametrize(
    "tokens, experts, k, message",
    [
        ([0, 0, 1, 1], [0, 1, 1, 2], 2, None),
        ([0, 1, 1, 0], [0, 1, 2, 0], None, None),
        ([0, 0, 1, 1], [0, 1, 1, 3], 2, "outside"),  # an expert past the end
        ([0, 0, 1, 1], [0, -1, 1, 2], 2, "outside"),
        ([0, 0, 1, 2], [0, 1, 1, 2], 2, "outside"),  # a token past the end, in a plan with pairs_per_token
        ([0, 0, -1, 1], [0, 1, 1, 2], 2, "outside"),
        ([0, 1, 0, 1], [0, 1, 1, 2], 2, "pairs_per_token=2 says"),  # in range, in the wrong order
        ([0, 1, 2, 1], [0, 1, 2, 0], None, "outside"),
        ([0, -1, 1, 1], [0, 1, 2, 0], None, "outside"),
    ],
)
def test_the_range_check_names_what_is_wrong(tokens, experts, k, message) -> None:
    """The per-call range check (one read back): indices outside the block's tokens or experts, and a plan
    whose pairs_per_token its token order contradicts, each named; a good plan passes."""
    from mixcompile.runtime.checks import check_routing_plan

    plan = mc.RoutingPlan(torch.tensor(tokens), torch.tensor(experts), torch.ones(4), 2, 3, pairs_per_token=k)
    if message is None:
        assert check_routing_plan(plan, source="router", num_tokens=2, num_experts=3) is plan
        return
    if message == "outside":
        message = r"token_index outside \[0, 2\) or expert_index outside \[0, 3\)"
    with pytest.raises(mc.PluginError, match=message):
        check_routing_plan(plan, source="router", num_tokens=2, num_experts=3)


@pytest.mark.parametrize("fault", ["picks_written", "own_picks"])
def test_picks_a_router_changed_or_made_are_range_checked(flaky, fault) -> None:
    """Listed by the same helper, but not the kernel's picks as they came out (eval: in training the
    router's own balancing loss would index with them first)."""
    block = _block().eval()
    block.router.fault = fault
    with pytest.raises(
        mc.PluginError, match=r"flaky.* returned a malformed RoutingPlan: .*expert_index outside"
    ):
        block(torch.randn(5, 8))


def _read_backs(block: mc.MoEBlock, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many tensors one forward of ``block`` reads back to the host in the plan checks (each waits for
    the GPU's queue there): calls of ``Tensor.__bool__`` from ``mixcompile/runtime/checks.py``."""
    calls = []
    original = torch.Tensor.__bool__

    def counted(tensor: torch.Tensor) -> bool:
        calls.append(sys._getframe(1).f_code.co_filename)
        return original(tensor)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__bool__", counted)
        block(x)
    return sum(name.endswith(str(Path("mixcompile", "runtime", "checks.py"))) for name in calls)


@pytest.mark.parametrize("kernel", ["torch", "flaky"])
def test_a_routing_steps_own_picks_are_not_read_back(flaky, kernel, monkeypatch) -> None:
    """A plan listing a built-in kernel's top-k picks as they came out (the built-in top-k routers) is in
    range by construction: no read back (on an H100 the wait cost a third of a 16K-token forward). A third
    party's picks are checked where they are made, a router's own picks in the plan (one read back each),
    and the debug switch checks everything."""
    x = torch.randn(5, 8)
    picks = 0 if kernel == "torch" else 1
    for training in (True, False):
        assert _read_backs(_block(router="topk", kernel=kernel).train(training), x, monkeypatch) == picks
    assert _read_backs(_block(router="expert_choice", kernel=kernel), x, monkeypatch) == 1
    assert _read_backs(_block(kernel=kernel), x, monkeypatch) == picks  # the faulty router, behaving
    with mc.debug_checks():
        assert _read_backs(_block(router="topk", kernel=kernel), x, monkeypatch) > 1


def test_under_inference_mode_only_a_built_in_routers_picks_skip_the_read_back(flaky, monkeypatch) -> None:
    """Inference tensors have no version counter to show the picks unchanged: a built-in router's class,
    which writes into nothing it lists, is trusted by identity (serving code runs under
    torch.inference_mode, where a read back per block would stall every decoded token); a third party's
    router, or a subclass of a built-in, is checked, and caught when it wrote into the picks."""
    x = torch.randn(5, 8)
    with torch.inference_mode():
        assert _read_backs(_block(router="topk").eval(), x, monkeypatch) == 0
        assert _read_backs(_block().eval(), x, monkeypatch) == 1  # the faulty router, behaving
        subclassed = _block(router="topk").eval()
        subclassed.router.__class__ = type("Sub", (type(subclassed.router),), {})
        assert _read_backs(subclassed, x, monkeypatch) == 1
        block = _block().eval()
        block.router.fault = "picks_written"
        with pytest.raises(mc.PluginError, match=r"flaky.* returned a malformed RoutingPlan: .*expert_index"):
            block(x)


def test_no_value_is_read_back_while_a_cuda_graph_is_captured(monkeypatch) -> None:
    """Reading a value back to the host is not allowed during CUDA-graph capture (found on an H100): the
    range and debug checks stand aside then, the structure checks stay."""
    from mixcompile.runtime.checks import check_routing_plan

    bad = mc.RoutingPlan(torch.tensor([0, 9]), torch.tensor([0, 1]), torch.ones(2), 2, 2)
    with pytest.raises(mc.PluginError, match="token_index outside"):
        check_routing_plan(bad, source="router", num_tokens=2, num_experts=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with mc.debug_checks():
        check_routing_plan(bad, source="router", num_tokens=2, num_experts=2)  # no read back, no error
    with pytest.raises(mc.PluginError, match="differ in length"):
        check_routing_plan(
            mc.RoutingPlan(torch.tensor([0]), torch.tensor([0, 1]), torch.ones(2), 2, 2),
            source="router",
            num_tokens=2,
            num_experts=2,
        )


class _Initializers:
    """Initializers that get the experts wrong in each way a plugin can."""

    @mc.hookimpl
    def register_initializers(self, register):
        def unfilled(experts, dense, *, generator=None):
            experts.w_in.fill_(0.1)  # the rest stays as it was: NaN

        def returning(experts, dense, *, generator=None):
            for param in experts.parameters():
                param.fill_(0.1)
            return experts

        def reshaping(experts, dense, *, generator=None):
            for param in experts.parameters():
                param.fill_(0.1)
            experts.w_in = torch.nn.Parameter(torch.zeros(3))

        for init in (unfilled, returning, reshaping):
            register(init.__name__, init)


@pytest.mark.parametrize(
    "init, fragment",
    [
        ("unfilled", r"initializer 'unfilled' .* left experts.w_out, experts.b_in, experts.b_out unfilled"),
        ("returning", r"initializer 'returning' .* returned a StackedExperts; .* returns None"),
        ("reshaping", r"initializer 'reshaping' .* replaced experts.w_in \(\(4, 32, 8\), torch.float32\)"),
    ],
)
def test_an_initializer_that_leaves_the_experts_wrong_is_refused_by_name(init, fragment) -> None:
    """Not a model reported as converted that computes NaN (the experts start empty)."""
    mc.register_plugin(_Initializers(), name="initializers_under_test")
    try:
        with pytest.raises(mc.PluginError, match=rf"FFN site 0: {fragment}"):
            _site_model(init=init)
    finally:
        mc.unregister_plugin("initializers_under_test")


class _Mixers:
    @mc.hookimpl
    def register_mixers(self, register):
        class Narrow(mc.ControllerMixer):
            def forward(self, x_g, present, *, sparse):
                merge = torch.softmax(self.logits(x_g), dim=2)
                return mc.MixPlan(merge[..., :1], merge)

        register("narrow", Narrow)


def test_a_malformed_mix_plan_names_the_mixer_and_keeps_the_error_type() -> None:
    mc.register_plugin(_Mixers(), name="mixers_under_test")
    try:
        with pytest.raises(mc.PluginError) as raised:
            mc.convert(_Net(), strategy="mot", num_experts=4, group_size=2, mixer="narrow")
    finally:
        mc.unregister_plugin("mixers_under_test")
    message = str(raised.value)
    assert "mixer 'narrow' (plugin 'mixers_under_test')" in message and "object at 0x" not in message
    assert "returned MixPlan.merge of shape" in message and message.startswith("FFN site 0 at 'mlp'")


def test_a_fault_after_its_plugin_was_unregistered_still_names_it() -> None:
    """The block holds the router; reporting its crash must not look the name up again (and lose it)."""
    mc.register_plugin(_Plugin(), name="flaky_plugin")
    block = _block()
    block.router.fault = "crash"
    mc.unregister_plugin("flaky_plugin")
    with pytest.raises(mc.PluginError, match=r"router 'flaky' \(plugin 'flaky_plugin'\) at mlp crashed: Ind"):
        block(torch.randn(5, 8))


class _Incomplete:
    @mc.hookimpl
    def register_routers(self, register):
        class NoTopK(torch.nn.Module):
            def __init__(self, d_model, num_experts, top_k):
                super().__init__()
                self.num_experts = num_experts

            def forward(self, x, kernel):
                raise AssertionError("never called")

        register("no_top_k", NoTopK)


def test_a_router_missing_part_of_the_protocol_is_told_which_part() -> None:
    mc.register_plugin(_Incomplete(), name="incomplete")
    try:
        with pytest.raises(
            mc.PluginError, match=r"built a NoTopK, expected .*mixcompile.Router \(it lacks top_k\)"
        ):
            mc.MoEBlock(8, 16, 4, router="no_top_k")
    finally:
        mc.unregister_plugin("incomplete")


def test_a_mixer_planning_in_another_dtype_runs_on_the_torch_kernel() -> None:
    """The Triton kernel casts the plan to the tokens' dtype; the torch kernel does the same (it crashed
    in an einsum, blamed on itself)."""

    class Float64Mixer(mc.ControllerMixer):
        def forward(self, x_g, present, *, sparse):
            merge = torch.softmax(self.logits(x_g), dim=2).double()
            return mc.MixPlan(merge, merge)

    block = mc.MoTBlock(8, 16, 4, group_size=2, kernel="torch")
    block.mixer = Float64Mixer(8, 4, 2)
    x = torch.randn(4, 3, 8)
    y = block(x)
    assert y.dtype == torch.float32 and bool(y.isfinite().all())
