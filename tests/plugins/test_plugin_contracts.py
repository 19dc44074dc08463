"""What mixcompile checks of a plugin beyond its crashes: kernels asked by ``kernel="auto"``, entry-point
names, factory signatures, the fields of router and mixer plans, and mixers' temperatures. Each fault is
an error naming the plugin, saying whose bug it is, with a hint."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from distributions import write_distribution

import mixcompile as mc
from mixcompile.runtime.checks import check_mix_plan
from mixcompile.runtime.kernels import get_kernel, resolve_kernel

CPU = torch.device("cpu")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x):
        return x + self.mlp(x)


class _Registered:
    """``with _Registered(name, **hooks):`` registers a plugin whose hooks register ``{name: factory}``."""

    def __init__(self, plugin: str, **kinds: dict) -> None:
        self.plugin, self.kinds = plugin, kinds

    def __enter__(self) -> None:
        hooks = {}
        for hook, entries in self.kinds.items():

            def implement(register, entries=entries):
                for name, factory in entries.items():
                    register(name, factory)

            hooks[hook] = mc.hookimpl(implement)
        mc.register_plugin(type("Plugin", (), {k: staticmethod(v) for k, v in hooks.items()})(), self.plugin)

    def __exit__(self, *exc: object) -> None:
        mc.unregister_plugin(self.plugin)


# -- 1. kernel="auto" asks every kernel: a kernel that crashes when asked is named -------------------------


class _LazyImportKernel(mc.Kernel):
    def supports(self, kind, device, dtype):
        import mixcompile_test_missing_cuda_library  # noqa: F401  (fails here: a lazy import of a GPU library)

        return True


class _PriorityPropertyKernel(mc.Kernel):
    def supports(self, kind, device, dtype):
        return True

    @property
    def priority(self):
        raise RuntimeError("no device queried yet")


class _AutoPriorityKernel(mc.Kernel):
    def supports(self, kind, device, dtype):
        return True

    def auto_priority(self, kind, device, dtype):
        raise KeyError(device.type)


class _NoneSupportsKernel(mc.Kernel):
    def supports(self, kind, device, dtype):
        pass  # forgot to return


class _TextPriorityKernel(mc.Kernel):
    priority = "high"

    def supports(self, kind, device, dtype):
        return True


@pytest.mark.parametrize(
    "factory, fragment",
    [
        (
            _LazyImportKernel,
            r"crashed in supports\(\): ModuleNotFoundError: No module named 'mixcompile_test_",
        ),
        (
            _PriorityPropertyKernel,
            r"crashed when its attributes were read: RuntimeError: no device queried yet\. This is",
        ),
        (_AutoPriorityKernel, r"crashed in auto_priority\(\): KeyError: 'cpu'\. This is a bug in the plugin"),
        (_NoneSupportsKernel, r"returned NoneType None from supports\(\), expected True or False"),
        (_TextPriorityKernel, r"has priority 'high', expected a number"),
    ],
)
def test_auto_names_a_kernel_that_fails_when_asked(factory, fragment) -> None:
    with _Registered("broken_kernels", register_kernels={"broken": factory}):
        with pytest.raises(mc.PluginError) as raised:
            resolve_kernel("auto", "moe", CPU, torch.float32)
        message = str(raised.value)
        assert message.startswith("kernel='auto' for moe blocks on cpu with torch.float32 asks every"), (
            message
        )
        assert "kernel 'broken' (plugin 'broken_kernels')" in message, message
        assert re.search(fragment, message), message
        assert "leave that plugin out (MIXCOMPILE_PLUGINS" in message and ".." not in message, message


class _TensorBoolKernel(type(get_kernel("torch"))):
    priority = 1000  # picked by auto whenever it says it supports the input

    def supports(self, kind, device, dtype):
        return torch.tensor(device.type == "cpu")


@pytest.mark.parametrize("answer", ["tensor", "numpy"])
def test_a_supports_answer_that_is_a_boolean_of_another_library_is_taken(answer) -> None:
    factory = _TensorBoolKernel
    if answer == "numpy":
        numpy = pytest.importorskip("numpy")
        factory = type(
            "NumpyBoolKernel", (_TensorBoolKernel,), {"supports": lambda s, k, d, t: numpy.bool_(True)}
        )
    with _Registered("bool_kernels", register_kernels={"bools": factory}):
        assert resolve_kernel("auto", "moe", CPU, torch.float32)[0] == "bools"


def test_a_conversion_with_the_default_kernel_names_the_kernel_whose_supports_crashed() -> None:
    """The reviewer's case: one installed kernel with a failing lazy import broke every conversion with a
    bare ModuleNotFoundError. No silent fallback either: which kernel auto picks must not hang on a bug."""
    with _Registered("fancy_kernels", register_kernels={"fancy": _LazyImportKernel}):
        with pytest.raises(
            mc.PluginError, match=r"kernel 'fancy' \(plugin 'fancy_kernels'\) crashed in supp"
        ):
            mc.convert(_Net(), strategy="moe", num_experts=4, top_k=2)
        with pytest.raises(
            mc.PluginError, match=r"kernel 'fancy' .* crashed in supports\(\).*bug in the plugin"
        ):
            resolve_kernel("fancy", "moe", CPU, torch.float32)  # named: the same error, without the auto part
    assert resolve_kernel("auto", "moe", CPU, torch.float32)[0] == "torch"  # gone with its plugin


class _MoEOnly(mc.Kernel):
    priority = -5

    def supports(self, kind, device, dtype):
        return True

    def moe(self, x, plan, experts):
        raise AssertionError("not used")


def test_a_crash_message_ending_in_a_full_stop_is_not_doubled() -> None:
    with _Registered("moe_only", register_kernels={"moe_only": _MoEOnly}):
        block = mc.MoTBlock(8, 16, 4, group_size=2, kernel="moe_only")
        with pytest.raises(mc.PluginError) as raised:
            block(torch.randn(2, 3, 8))
    assert "does not run MoT blocks. This is a bug in the plugin" in str(raised.value)
    assert ".." not in str(raised.value)


# -- 2, 3. entry-point names ------------------------------------------------------------------------------


def _router_module(router: str) -> str:
    return f"""
        import mixcompile as mc
        from mixcompile_plugins.routers import TopKRouter

        @mc.hookimpl
        def register_routers(register):
            register({router!r}, TopKRouter)
    """


def test_two_distributions_with_one_entry_point_name_are_refused_naming_both(site, fresh_registry) -> None:
    write_distribution(
        site, "contract-one", "routers = contract_ep_one", "contract_ep_one", _router_module("one")
    )
    write_distribution(
        site, "contract-two", "routers = contract_ep_two", "contract_ep_two", _router_module("two")
    )
    with pytest.raises(mc.PluginError) as raised:
        mc.registry()
    message = str(raised.value)
    assert "2 installed distributions declare a mixcompile entry point named 'routers'" in message, message
    assert "'contract_ep_one' (package 'contract-one' 1.0)" in message, message
    assert "'contract_ep_two' (package 'contract-two' 1.0)" in message, message
    assert "Uninstall one, or ask its author to rename the entry point" in message, message
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "none")  # left out: nothing to choose between
    mc.plugins.manager.reset()
    assert "one" not in mc.registry().names("router") and "two" not in mc.registry().names("router")


@pytest.mark.parametrize("selection", ["all", "mixcompile_plugins.routers"])
def test_an_entry_point_named_like_a_registered_plugin_is_refused(site, fresh_registry, selection) -> None:
    """It was skipped without a word (its router never appeared), even when MIXCOMPILE_PLUGINS named it."""
    write_distribution(
        site,
        "contract-shadow",
        "mixcompile_plugins.routers = contract_ep_shadow",
        "contract_ep_shadow",
        _router_module("never_seen"),
    )
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", selection)
    with pytest.raises(
        mc.PluginError,
        match=r"entry point 'mixcompile_plugins.routers' = 'contract_ep_shadow' \(package "
        r"'contract-shadow' 1.0\) has the name of plugin 'mixcompile_plugins.routers', which is already "
        r"registered.*rename",
    ):
        mc.registry()


README_STYLE = textwrap.dedent("""
    import mixcompile as mc

    class MyPlugin:
        @mc.hookimpl
        def register_routers(self, register):
            from mixcompile_plugins.routers import TopKRouter
            register("first", TopKRouter)
""")


def test_an_entry_point_naming_a_module_whose_hooks_are_methods_says_to_name_an_instance(site) -> None:
    write_distribution(site, "contract-cls", "my_plugin = contract_ep_cls", "contract_ep_cls", README_STYLE)
    with pytest.raises(
        mc.PluginError,
        match=r"plugin 'my_plugin' \(entry point 'contract_ep_cls' of package 'contract-cls' 1.0\) "
        r"implements no mixcompile hook itself: its hooks are methods of class MyPlugin\. "
        r".*'PLUGIN = MyPlugin\(\)'"
        r".*my_plugin = \"contract_ep_cls:PLUGIN\"",
    ):
        mc.registry()


def test_an_entry_point_naming_an_instance_loads(site) -> None:
    write_distribution(
        site,
        "contract-inst",
        "my_plugin = contract_ep_inst:PLUGIN",
        "contract_ep_inst",
        README_STYLE + "\nPLUGIN = MyPlugin()\n",
    )
    assert mc.registry().get("router", "first").plugin == "my_plugin"


def test_an_entry_point_module_registering_itself_at_import_is_told_why_it_fails(site) -> None:
    """The README example verbatim as the entry point's module: register_plugin at import time re-entered
    the loading of entry points and failed with 'implements no hook' and a doubled full stop."""
    source = README_STYLE + '\nmc.register_plugin(MyPlugin(), name="my_plugin")\n'
    write_distribution(site, "contract-self", "my_plugin = contract_ep_self", "contract_ep_self", source)
    with pytest.raises(mc.PluginError) as raised:
        mc.registry()
    message = str(raised.value)
    assert message.startswith("the module of entry point 'my_plugin' = 'contract_ep_self'"), message
    assert "while being imported" in message and "leave register_plugin out of that module" in message
    assert ".." not in message


# -- 6. factory signatures: mixcompile's own arguments are the plugin's business, options the user's ------


class _NoArguments:
    def __init__(self) -> None:
        pass


def _no_generator(experts, dense) -> None:
    raise AssertionError("never called")


def _initializer(experts, dense, *, generator, scale: float = 1.0) -> None:
    for param in experts.parameters():
        param.normal_(0.0, 0.02 * scale, generator=generator)


class _NeedsDevice(mc.Kernel):
    def __init__(self, device_index: int) -> None:
        self.device_index = device_index

    def supports(self, kind, device, dtype):
        return True


def test_a_factory_that_cannot_take_what_mixcompile_passes_is_a_plugin_bug() -> None:
    """It was ConfigError 'rejected its options {}' (exit 2 from the CLI, a user error) though the user
    passed nothing."""
    plugin = {
        "register_routers": {"no_args": _NoArguments},
        "register_mixers": {"no_args": _NoArguments},
        "register_initializers": {"no_generator": _no_generator, "seeded": _initializer},
    }
    with _Registered("wrong_signatures", **plugin):
        with pytest.raises(mc.PluginError) as raised:
            mc.MoEBlock(8, 16, 4, top_k=2, router="no_args")
        assert not isinstance(raised.value, mc.ConfigError)
        assert str(raised.value) == (
            "router 'no_args' (plugin 'wrong_signatures') has a factory mixcompile cannot call: a router is "
            "built as factory(d_model, num_experts, top_k, **options), but _NoArguments() does not take that "
            "(too many positional arguments). This is a bug in the plugin: its factory needs that signature; "
            "report it to its author."
        )
        with pytest.raises(
            mc.PluginError, match=r"a mixer is built as factory\(d_model, num_experts, group_s"
        ):
            mc.MoTBlock(8, 16, 4, group_size=2, mixer="no_args")
        with pytest.raises(
            mc.PluginError,
            match=r"initializer 'no_generator' \(plugin 'wrong_signatures'\) at mlp has a factory mixcompile "
            r"cannot call: an initializer is built as factory\(experts, dense, \*, generator, \*\*options\), "
            r"but _no_generator\(experts, dense\) does not take that \(got an unexpected keyword argument "
            r"'generator'\)\. This is a bug in the plugin",
        ):
            mc.convert(_Net(), strategy="moe", num_experts=4, top_k=2, init="no_generator")
    with _Registered("wrong_kernel", register_kernels={"needs_device": _NeedsDevice}):
        with pytest.raises(
            mc.PluginError, match=r"a kernel is built as factory\(\), but _NeedsDevice\(device_"
        ):
            mc.MoEBlock(8, 16, 4, top_k=2, kernel="needs_device")
        with pytest.raises(
            mc.PluginError, match=r"kernel='auto' .* asks every registered kernel, and kernel"
        ):
            mc.MoEBlock(8, 16, 4, top_k=2)  # a broken kernel is not skipped: auto's pick would depend on it


class _LinearRouter(torch.nn.Linear):
    """A router that is a linear layer, with an option of its own named like one of nn.Linear's."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x, kernel):
        probs, experts, weights = kernel.topk_routing(super().forward(x), self.top_k)
        tokens = torch.arange(x.shape[0]).repeat_interleave(self.top_k)
        return mc.RoutingPlan(
            token_index=tokens,
            expert_index=experts.reshape(-1),
            weight=weights.reshape(-1),
            probs=probs,
            pairs_per_token=self.top_k,
            num_tokens=x.shape[0],
            num_experts=self.num_experts,
        )


def test_an_option_of_a_subclass_is_its_own_whatever_its_base_takes_positionally() -> None:
    """The positional arguments fill the factory's own parameters, not its base class's: nn.Linear's third
    parameter is bias, which the router's own bias option was taken for."""
    with _Registered("linear_routers", register_routers={"linear": _LinearRouter}):
        block = mc.MoEBlock(16, 32, 4, top_k=2, router="linear", router_options={"bias": True})
        assert block.router.bias is not None
        assert block(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_options_the_user_gave_stay_a_config_error_listing_only_options() -> None:
    with _Registered("signatures", register_initializers={"seeded": _initializer}):
        with pytest.raises(mc.ConfigError) as raised:
            mc.convert(
                _Net(), strategy="moe", num_experts=4, top_k=2, init="seeded", init_options={"scal": 2}
            )
        message = str(raised.value)
        assert (
            "initializer 'seeded' (plugin 'signatures') at mlp rejected its options: no option 'scal'. "
            in message
        )
        assert message.endswith("Did you mean 'scale'? Its options: scale.")  # not 'generator': mixcompile's
        mc.convert(_Net(), strategy="moe", num_experts=4, top_k=2, init="seeded", init_options={"scale": 2})
    with pytest.raises(
        mc.ConfigError, match=r"router 'topk' .* no option 'd_model'.*Its options: (?!.*d_model)"
    ):
        mc.MoEBlock(8, 16, 4, top_k=2, router_options={"d_model": 8})  # an argument mixcompile passes itself


class _NeedsScale(mc.LearnedRouter):
    def __init__(self, d_model, num_experts, top_k, *, scale: float) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.scale = scale


def test_a_required_option_left_out_is_the_users_to_give() -> None:
    with _Registered("needs_scale", register_routers={"scaled": _NeedsScale}):
        with pytest.raises(
            mc.ConfigError, match=r"router 'scaled' .* rejected its options \{\}: missing a requ"
        ):
            mc.MoEBlock(8, 16, 4, top_k=2, router="scaled")
        assert (
            mc.MoEBlock(8, 16, 4, top_k=2, router="scaled", router_options={"scale": 2.0}).router.scale == 2.0
        )


# -- 5. RoutingPlan.probs and aux_losses -------------------------------------------------------------------


class _PlanRouter(mc.LearnedRouter):
    fault = ""

    def forward(self, x, kernel):
        probs, chosen, weights = kernel.topk_routing(self.logits(x), self.top_k)
        plan = self.token_choice_plan(self.logits(x), chosen, weights, probs)
        if self.fault == "probs_list":
            plan.probs = plan.probs.tolist()
        elif self.fault == "probs_shape":
            plan.probs = plan.probs.t()
        elif self.fault == "probs_int":
            plan.probs = plan.probs.argmax(-1, keepdim=True).expand_as(plan.probs)
        elif self.fault == "aux_vector":
            plan.aux_losses = {"mine": plan.weight[:3] * 0.01}
        elif self.fault == "aux_float":
            plan.aux_losses = {"mine": 0.01}
        elif self.fault == "aux_list":
            plan.aux_losses = [plan.weight.sum()]
        return plan


@pytest.mark.parametrize(
    "fault, fragment",
    [
        ("probs_list", r"probs must be a tensor \[10, 4\] or None, got list"),
        ("probs_shape", r"probs has shape \(4, 10\), expected \[10, 4\] \(tokens x experts\)"),
        ("probs_int", r"probs must be floating point, got torch.int64"),
        (
            "aux_vector",
            r"aux_losses\['mine'\] has shape \(3,\) and dtype torch.float32, expected a 0-dim float",
        ),
        ("aux_float", r"aux_losses\['mine'\] is a float, expected a 0-dim floating tensor"),
        ("aux_list", r"aux_losses must be a dict of name -> scalar tensor, got list"),
    ],
)
def test_malformed_probs_and_aux_losses_name_the_router(fault, fragment) -> None:
    """They failed later with a bare AttributeError (statistics, mc.aux_loss) or in backward."""
    with _Registered("plan_fields", register_routers={"fields": _PlanRouter}):
        block = mc.MoEBlock(8, 16, 4, top_k=2, router="fields").train()
    block.router.fault = fault
    with pytest.raises(
        mc.PluginError,
        match=rf"^router 'fields' \(plugin 'plan_fields'\) returned a malformed RoutingPlan: {fragment}",
    ):
        block(torch.randn(2, 5, 8))
    block.router.fault = ""
    y = block(torch.randn(2, 5, 8))
    (y.square().mean() + mc.aux_loss(block)).backward()  # a well-formed plan trains


# -- 4. a mixer must give absent group members no weight (debug checks) ------------------------------------


class _IgnoresPresent(mc.ControllerMixer):
    """Forgets ``present``: the zero padding of a short last group takes part in the mix."""

    def forward(self, x_g, present, *, sparse):
        merge = torch.softmax(self.logits(x_g), dim=2).to(x_g.dtype)
        return mc.MixPlan(merge, merge)


def _plans(mixer: torch.nn.Module):
    x_g = torch.randn(3, 2, 2, 8)  # [T, n, G, d]
    present = torch.tensor([[True, True], [True, False]])[None]  # [1, n, G]: the last group is short
    return mixer(x_g, present, sparse=False), present


@pytest.mark.parametrize("field", ["merge", "emit"])
def test_weight_on_absent_members_is_found_under_the_debug_checks(field) -> None:
    good, present = _plans(mc.registry().get("mixer", "softmax").factory(8, 4, 2))
    bad, _ = _plans(_IgnoresPresent(8, 4, 2))
    plan = mc.MixPlan(
        bad.merge if field == "merge" else good.merge, bad.emit if field == "emit" else good.emit
    )
    shape = (3, 2, 2, 4)
    check_mix_plan(plan, source="mixer 'ignores' (plugin 'p')", shape=shape, present=present)  # switch off
    with mc.debug_checks():
        check_mix_plan(good, source="mixer 'softmax'", shape=shape, present=present)
        check_mix_plan(good, source="mixer 'softmax'", shape=shape, present=present.expand(3, -1, -1))
        with pytest.raises(
            mc.PluginError,
            match=rf"^mixer 'ignores' \(plugin 'p'\) returned MixPlan\.{field} with weight on absent group "
            r"members \(present=False: .*Mask with `present`",
        ):
            check_mix_plan(plan, source="mixer 'ignores' (plugin 'p')", shape=shape, present=present)


def test_a_block_whose_mixer_ignores_present_is_refused_under_the_debug_checks() -> None:
    with _Registered("careless_mixers", register_mixers={"ignores": _IgnoresPresent}):
        block = mc.MoTBlock(8, 16, 4, group_size=2, mixer="ignores")
    x = torch.randn(3, 5, 8)  # 3 sequences in groups of 2: the last group lacks a member
    block(x)  # not looked for without the switch
    with mc.debug_checks(), pytest.raises(mc.PluginError, match=r"mixer 'ignores' .* weight on absent"):
        block(x)


# -- 7. set_mot_temperature and a temperature kept in a buffer --------------------------------------------


class _BufferTemperature(mc.ControllerMixer):
    def __init__(self, d_model, num_experts, group_size, dtype=torch.float32):
        super().__init__(d_model, num_experts, group_size)
        self.register_buffer("temperature", torch.tensor(1.0, dtype=dtype))

    def forward(self, x_g, present, *, sparse):
        mask = present[..., None]
        logits = (self.logits(x_g) / self.temperature).masked_fill(
            ~mask & mask.any(-2, keepdim=True), -torch.inf
        )
        merge = (torch.softmax(logits, dim=2) * mask).to(x_g.dtype)
        return mc.MixPlan(merge, merge)


class _IntBufferTemperature(_BufferTemperature):
    def __init__(self, d_model, num_experts, group_size):
        super().__init__(d_model, num_experts, group_size, dtype=torch.int64)


def test_set_mot_temperature_fills_a_buffer_in_place_and_keeps_a_float_a_float() -> None:
    with _Registered("buffer_mixers", register_mixers={"buffered": _BufferTemperature}):
        model = mc.convert(_Net(), strategy="mot", num_experts=4, group_size=2, mixer="buffered")
    buffer = model.mlp.mixer.temperature
    assert mc.set_mot_temperature(model, 0.5) == 1
    assert model.mlp.mixer.temperature is buffer and buffer.item() == 0.5  # the registered buffer, in place
    assert model.state_dict()["mlp.mixer.temperature"].item() == 0.5
    plain = mc.convert(_Net(), strategy="mot", num_experts=4, group_size=2)
    mc.set_mot_temperature(plain, 0.25)
    assert type(plain.mlp.mixer.temperature) is float and plain.mlp.mixer.temperature == 0.25


def test_set_mot_temperature_refuses_an_integer_buffer_before_changing_anything() -> None:
    with _Registered("int_mixers", register_mixers={"int_buffer": _IntBufferTemperature}):
        model = mc.convert(
            _Net(), strategy="mot", num_experts=4, group_size=2, mixer="int_buffer", verify=False
        )
    with pytest.raises(
        mc.ConfigError, match=r"mixer at 'mlp' \('int_buffer'\) keeps its temperature in a torch"
    ):
        mc.set_mot_temperature(model, 0.5)
    assert model.mlp.mixer.temperature.item() == 1
