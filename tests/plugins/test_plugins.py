import sys
import textwrap

import pytest
import torch
from distributions import write_distribution

import mixcompile as mc
from mixcompile.plugins.manager import plugin_manager


def test_builtins_register_through_the_hooks():
    names = {(r.kind, r.name): r.plugin for r in mc.registry().all()}
    assert names[("router", "topk")] == "mixcompile_plugins.routers"
    assert names[("mixer", "softmax")] == "mixcompile_plugins.mixers"
    assert names[("kernel", "torch")] == "mixcompile_plugins.kernels"
    assert names[("initializer", "split")] == "mixcompile_plugins.initializers"
    assert {"topk", "switch", "expert_choice", "hash"} <= set(mc.registry().names("router"))


class _Halving(mc.LearnedRouter):
    """A router from 'another package': always the first k experts, weights 1/k."""

    def forward(self, x, kernel):
        n = x.shape[0]
        chosen = torch.arange(self.top_k).expand(n, -1)
        return self.token_choice_plan(self.logits(x), chosen, torch.full((n, self.top_k), 1.0 / self.top_k))


class _InProcessPlugin:
    @mc.hookimpl
    def register_routers(self, register):
        register("first_k", _Halving, description="test router")


def test_in_process_plugin_is_usable_by_name(fresh_registry):
    name = mc.register_plugin(_InProcessPlugin(), name="tests.first_k")
    assert mc.registry().get("router", "first_k").plugin == "tests.first_k"
    block = mc.MoEBlock(4, 8, 3, top_k=2, router="first_k")
    block(torch.randn(5, 4))
    assert mc.stats(block)[""]["expert_load"].tolist() == [5, 5, 0]
    mc.unregister_plugin(name)
    with pytest.raises(mc.UnknownNameError, match="unknown router 'first_k'"):
        mc.MoEBlock(4, 8, 3, router="first_k")


def test_a_saved_model_whose_plugin_is_gone_says_to_install_it(fresh_registry, tmp_path):
    name = mc.register_plugin(_InProcessPlugin(), name="tests.first_k")
    model = mc.convert(mc.build_tiny_gpt(), strategy="moe", num_experts=4, router="first_k", verify=False)
    mc.save(model, tmp_path / "saved")
    mc.unregister_plugin(name)
    with pytest.raises(mc.LoadError, match="unknown router here, 'first_k': no installed plugin"):
        mc.load(tmp_path / "saved")


def _install_distribution(tmp_path, monkeypatch, module_source, entry_name="cosine_test"):
    """A real (unzipped) distribution on sys.path: metadata plus a `mixcompile` entry point."""
    entry_points = f"{entry_name} = thirdparty_router"
    write_distribution(tmp_path, "thirdparty-router", entry_points, "thirdparty_router", module_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "thirdparty_router", raising=False)


ROUTER_PLUGIN = """
    import torch
    import mixcompile as mc
    class Cosine(mc.LearnedRouter):
        def forward(self, x, kernel):
            w = torch.nn.functional.normalize(self.gate.weight, dim=1)
            logits = torch.nn.functional.normalize(x, dim=1) @ w.t() * 10
            chosen = torch.topk(logits, self.top_k, dim=-1).indices
            weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
            return self.token_choice_plan(logits, chosen, weights)

    @mc.hookimpl
    def register_routers(register):
        register("cosine", Cosine, description="cosine-similarity router")
"""


def test_entry_point_plugin_is_loaded_and_usable(fresh_registry, tmp_path):
    _install_distribution(tmp_path, fresh_registry, ROUTER_PLUGIN)
    entry = mc.registry().get("router", "cosine")
    assert entry.plugin == "cosine_test"
    block = mc.MoEBlock(4, 8, 3, top_k=2, router="cosine")
    assert block(torch.randn(2, 5, 4)).shape == (2, 5, 4)


@pytest.mark.parametrize("selection,loaded", [("none", False), ("cosine_test", True), ("all", True)])
def test_environment_variable_restricts_entry_points(fresh_registry, tmp_path, selection, loaded):
    _install_distribution(tmp_path, fresh_registry, ROUTER_PLUGIN)
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", selection)
    assert ("cosine" in mc.registry().names("router")) == loaded
    assert "topk" in mc.registry().names("router")  # built-ins always load


def test_environment_variable_with_unknown_plugin(fresh_registry, tmp_path):
    _install_distribution(tmp_path, fresh_registry, ROUTER_PLUGIN)
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "cosine_tst")
    with pytest.raises(mc.UnknownNameError, match="Did you mean 'cosine_test'"):
        mc.registry()


def test_plugin_that_fails_to_import_is_named(fresh_registry, tmp_path):
    _install_distribution(tmp_path, fresh_registry, "raise RuntimeError('boom')\n", entry_name="broken")
    with pytest.raises(mc.PluginError, match="plugin 'broken' .* failed to import: RuntimeError: boom"):
        mc.registry()


class _Raising:
    @mc.hookimpl
    def register_kernels(self, register):
        raise RuntimeError("no GPU here")


class _NotCallable:
    @mc.hookimpl
    def register_mixers(self, register):
        register("broken", 42)


class _Duplicate:
    @mc.hookimpl
    def register_routers(self, register):
        register("topk", _Halving)


class _Misspelt:
    @mc.hookimpl
    def register_router(self, register):
        pass


class _WrongArgument:
    @mc.hookimpl
    def register_routers(self, add):
        pass


@pytest.mark.parametrize(
    "plugin,match",
    [
        (_Raising(), "plugin 'bad' raised in hook register_kernels: RuntimeError: no GPU here"),
        (_NotCallable(), "plugin 'bad' registered mixer 'broken' with a non-callable factory"),
        (
            _Duplicate(),
            "plugin 'bad' registered router 'topk', which plugin 'mixcompile_plugins.routers' already",
        ),
    ],
)
def test_misbehaving_plugin_is_named_and_refused_at_registration(fresh_registry, plugin, match):
    with pytest.raises(mc.PluginError, match=match):
        mc.register_plugin(plugin, name="bad")
    assert plugin_manager().get_plugin("bad") is None  # refused, and the registry is as it was
    assert mc.registry().get("router", "topk").plugin == "mixcompile_plugins.routers"


def test_a_second_plugin_under_a_taken_name_leaves_the_first_registered(fresh_registry):
    first = _InProcessPlugin()
    mc.register_plugin(first, name="tests.taken")
    with pytest.raises(mc.PluginError, match="a plugin named 'tests.taken' is already registered; unreg"):
        mc.register_plugin(_InProcessPlugin(), name="tests.taken")
    with pytest.raises(mc.PluginError, match=r"already registered \(this plugin\)"):
        mc.register_plugin(first, name="tests.taken")
    with pytest.raises(mc.PluginError, match="plugin 'again' is already registered, as 'tests.taken'"):
        mc.register_plugin(first, name="again")
    assert plugin_manager().get_plugin("tests.taken") is first
    assert "first_k" in mc.registry().names("router")


@pytest.mark.parametrize("plugin", [42, object()])
def test_an_object_without_hooks_is_refused(fresh_registry, plugin):
    with pytest.raises(mc.PluginError, match="implements no mixcompile hook"):
        mc.register_plugin(plugin, name="hookless")
    assert plugin_manager().get_plugin("hookless") is None


@pytest.mark.parametrize("plugin", [_Misspelt(), _WrongArgument()])
def test_malformed_plugin_is_refused_at_registration(fresh_registry, plugin):
    with pytest.raises(mc.PluginError, match="plugin 'bad' is malformed"):
        mc.register_plugin(plugin, name="bad")
    assert "topk" in mc.registry().names("router")  # the manager is still usable


class _BadPlanRouter(mc.LearnedRouter):
    def forward(self, x, kernel):
        n = x.shape[0]
        twice = torch.zeros(2 * n, dtype=torch.long)
        return mc.RoutingPlan(torch.arange(n).repeat(2), twice, torch.ones(2 * n), n, self.num_experts)


class _WrongShapeKernel(mc.Kernel):
    priority = 100

    def supports(self, kind, device, dtype):
        return True

    def moe(self, x, plan, experts):
        return x[:-1]


class _BadOutputs:
    @mc.hookimpl
    def register_routers(self, register):
        register("twice", _BadPlanRouter)

    @mc.hookimpl
    def register_kernels(self, register):
        register("short", _WrongShapeKernel)


def test_malformed_outputs_name_the_plugin(fresh_registry):
    mc.register_plugin(_BadOutputs(), name="sloppy")
    twice = mc.MoEBlock(4, 8, 3, top_k=1, router="twice", kernel="torch")
    duplicate = r"router 'twice' \(plugin 'sloppy'\).* twice"
    with mc.debug_checks(), pytest.raises(mc.PluginError, match=duplicate):
        twice(torch.randn(3, 4))  # a duplicate pair needs a sort to find: checked under the debug switch
    block = mc.MoEBlock(4, 8, 3, top_k=1)
    assert block.kernel_for("cpu", torch.float32) == "short"  # auto takes the highest priority
    for _ in range(2):  # on every call, not only the first
        with pytest.raises(mc.PluginError, match=r"kernel 'short' \(plugin 'sloppy'\) returned \(2, 4\)"):
            block(torch.randn(3, 4))


def test_kernel_that_does_not_support_the_input(fresh_registry):
    class Picky(mc.Kernel):
        def supports(self, kind, device, dtype):
            return device.type == "cuda"

    class Plugin:
        @mc.hookimpl
        def register_kernels(self, register):
            register("gpu_only", Picky)

    mc.register_plugin(Plugin(), name="picky")
    block = mc.MoEBlock(4, 8, 2, top_k=1, kernel="gpu_only")
    with pytest.raises(mc.ConfigError, match="kernel 'gpu_only' does not support moe blocks on cpu"):
        block(torch.randn(3, 4))
    assert mc.MoEBlock(4, 8, 2, top_k=1).kernel_for("cpu", torch.float32) == "torch"


def test_a_plugins_warning_points_at_the_users_line(fresh_registry, tmp_path, monkeypatch):
    """mc.warn, which the built-ins use, skips the warning plugin's own package as it skips mixcompile's and
    torch's frames: the user sees the line that called the model, not the plugin's nor torch's module.py."""
    package = tmp_path / "noisy_router"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import mixcompile as mc

            class Noisy(mc.LearnedRouter):
                def forward(self, x, kernel):
                    mc.warn("noisy router says hello")
                    probs, chosen, weights = kernel.topk_routing(self.logits(x), self.top_k)
                    return self.token_choice_plan(self.logits(x), chosen, weights, probs)

            class Plugin:
                @mc.hookimpl
                def register_routers(self, register):
                    register("noisy", Noisy)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (package / "main.py").write_text(  # the user's code in the plugin's own package
        "import torch\nimport mixcompile as mc\n\ndef run():\n"
        "    mc.MoEBlock(4, 8, 3, top_k=2, router='noisy')(torch.randn(5, 4))\n"
    )
    import noisy_router
    import noisy_router.main

    mc.register_plugin(noisy_router.Plugin(), name="tests.noisy")
    block = mc.MoEBlock(4, 8, 3, top_k=2, router="noisy")
    with pytest.warns(UserWarning, match="noisy router says hello") as said:
        block(torch.randn(5, 4))
    assert [w.filename for w in said] == [__file__]
    with pytest.warns(UserWarning, match="noisy router says hello") as said:
        noisy_router.main.run()
    assert [w.filename for w in said] == [str(package / "main.py")]
