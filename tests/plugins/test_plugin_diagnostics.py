"""What a user of a broken plugin is told: the installed package to fix, uninstall or leave out (not only the
entry point's name), the closest hook to a misspelt one, why a hook may not look the registry up, and where
a plugin's warning points; and what `mixcompile plugins` lists."""

from __future__ import annotations

import json
import sys
import textwrap
import threading

import pytest
import torch
from distributions import write_distribution

import mixcompile as mc
from mixcompile.cli.main import main
from mixcompile.plugins import manager
from mixcompile.plugins.manager import plugin_manager

GOOD = """
    import mixcompile as mc

    @mc.hookimpl
    def register_routers(register):
        register("sharp", mc.LearnedRouter, description="a sharp router")
"""


def _install(
    site, source: str, *, entry: str = "acme", value: str = "diag_acme", dist: str = "acme-moe-tools"
):
    """A real (unzipped) distribution ``dist`` 1.0 declaring ``entry = value``, its module from ``source``."""
    write_distribution(site, dist, f"{entry} = {value}", value.partition(":")[0], source)


BROKEN = {
    "raises in its hook": (
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_kernels(register):
            raise RuntimeError("no GPU here")
        """,
        "raised in hook register_kernels: RuntimeError: no GPU here.",
    ),
    "takes a built-in's name": (
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_routers(register):
            register("topk", mc.LearnedRouter)
        """,
        "registered router 'topk', which plugin 'mixcompile_plugins.routers' already registered",
    ),
    "names the hook's argument wrongly": (
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_routers(reg):
            pass
        """,
        "is malformed: ",
    ),
    "misspells a hook": (
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_router(register):
            pass
        """,
        "Did you mean 'register_routers' (not 'register_router')?",
    ),
    "leaves @hookimpl out": (
        """
        def register_routers(register):
            pass
        """,
        "implements no mixcompile hook",
    ),
    "registers an invalid name": (
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_routers(register):
            register("my router", mc.LearnedRouter)
        """,
        "registered a router with an invalid name 'my router': use letters, digits, '_', '-' or '.'.",
    ),
    "fails to import": (
        "raise RuntimeError('boom at import')\n",
        "failed to import: RuntimeError: boom at import.",
    ),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_broken_installed_plugin_names_its_package_and_how_to_leave_it_out(site, fresh_registry, fault):
    """The entry point's name ('acme') is not what a user uninstalls: its package ('acme-moe-tools') is."""
    source, what = BROKEN[fault]
    _install(site, source)
    _install(site, GOOD, entry="other", value="diag_other", dist="other-tools")
    with pytest.raises(mc.PluginError) as raised:
        mc.registry()
    message = str(raised.value)
    assert message.startswith("plugin 'acme' (") and "package 'acme-moe-tools' 1.0)" in message, message
    assert what in message, message
    assert message.endswith(
        "Until it is fixed, uninstall package 'acme-moe-tools' 1.0, or leave it out with "
        "MIXCOMPILE_PLUGINS=other."
    ), message
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "other")  # what it says works
    mc.plugins.manager.reset()
    assert "sharp" in mc.registry().names("router")


def test_two_installed_plugins_registering_one_name_are_named_with_their_packages(site) -> None:
    _install(site, GOOD)
    _install(site, GOOD, entry="other", value="diag_other", dist="other-tools")
    with pytest.raises(mc.PluginError) as raised:
        mc.registry()
    assert str(raised.value) == (
        "plugin 'other' (package 'other-tools' 1.0) registered router 'sharp', which plugin 'acme' (package "
        "'acme-moe-tools' 1.0) already registered: rename one of them. Until it is fixed, uninstall package "
        "'other-tools' 1.0, or leave it out with MIXCOMPILE_PLUGINS=acme."
    )


def test_an_in_process_plugin_is_not_told_about_packages_or_the_environment_variable(fresh_registry) -> None:
    """MIXCOMPILE_PLUGINS selects entry points only: it cannot leave out what register_plugin registers."""

    class Raising:
        @mc.hookimpl
        def register_kernels(self, register):
            raise RuntimeError("no GPU here")

    with pytest.raises(mc.PluginError) as raised:
        mc.register_plugin(Raising(), name="acme")
    assert str(raised.value) == "plugin 'acme' raised in hook register_kernels: RuntimeError: no GPU here."


def test_an_unregistered_entry_points_name_is_not_its_package_any_more(site) -> None:
    _install(site, GOOD)
    mc.unregister_plugin("acme")

    class Raising:
        @mc.hookimpl
        def register_kernels(self, register):
            raise RuntimeError("no GPU here")

    with pytest.raises(mc.PluginError, match=r"^plugin 'acme' raised in hook register_kernels: .*here\.$"):
        mc.register_plugin(Raising(), name="acme")


def test_a_misspelt_hook_of_an_in_process_plugin_gets_the_closest_hook(fresh_registry) -> None:
    class Misspelt:
        @mc.hookimpl
        def register_kernel(self, register):
            pass

    with pytest.raises(mc.PluginError, match=r"Did you mean 'register_kernels' \(not 'register_kernel'\)\?"):
        mc.register_plugin(Misspelt(), name="misspelt")
    assert plugin_manager().get_plugin("misspelt") is None


CLASS_PLUGIN = """
    import mixcompile as mc

    class Plugin:
        @mc.hookimpl
        def register_routers(self, register):
            register("epc", mc.LearnedRouter)
"""


def test_an_entry_point_naming_a_class_says_to_name_an_instance(site) -> None:
    """It failed inside the hook, with "missing 1 required positional argument: 'self'"."""
    _install(site, CLASS_PLUGIN, value="diag_acme:Plugin")
    with pytest.raises(mc.PluginError) as raised:
        mc.registry()
    message = str(raised.value)
    assert message.startswith(
        "plugin 'acme' (entry point 'diag_acme:Plugin' of package 'acme-moe-tools' 1.0) names class Plugin, "
        "whose hooks are methods: they need an instance."
    ), message
    assert "add 'PLUGIN = Plugin()' to module diag_acme and declare acme = \"diag_acme:PLUGIN\"" in message
    assert "self" not in message


def test_an_entry_point_naming_a_class_with_static_hooks_loads(site) -> None:
    """A class whose hooks need no instance is a plugin as it is (pluggy calls its functions)."""
    source = CLASS_PLUGIN.replace("@mc.hookimpl", "@staticmethod\n        @mc.hookimpl").replace("self, ", "")
    _install(site, source, value="diag_acme:Plugin")
    assert mc.registry().get("router", "epc").plugin == "acme"


class _LooksUp:
    """A plugin wrapping a router another plugin registers, looked up inside its hook."""

    def __init__(self, how: str) -> None:
        self.how = how

    @mc.hookimpl
    def register_routers(self, register):
        if self.how == "block":
            mc.MoEBlock(4, 8, 2)
        base = mc.registry().get("router", "topk").factory
        register("topk_wrapped", base)


@pytest.mark.parametrize("how", ["registry", "block"])
@pytest.mark.parametrize("built", [False, True])
def test_a_hook_looking_the_registry_up_is_told_why_it_cannot(fresh_registry, how, built) -> None:
    """It recursed without end (a bare RecursionError, blamed on a built-in plugin) where the registry was not
    built yet, and got the old registry where it was."""
    if built:
        mc.registry()
    with pytest.raises(mc.PluginError) as raised:
        mc.register_plugin(_LooksUp(how), name="wrap")
    assert str(raised.value) == (
        "plugin 'wrap' looked the registry up (mixcompile.registry(), a look-up, a block built) inside its "
        "hook register_routers: hooks run while the registry is being built, so the other plugins are not "
        "there to find yet. Look them up when the registered factory is called, not while registering it."
    )
    assert not isinstance(raised.value.__cause__, RecursionError)
    assert plugin_manager().get_plugin("wrap") is None
    assert "topk_wrapped" not in mc.registry().names("router")  # and the registry is usable again


def test_an_installed_hook_looking_the_registry_up_names_its_package(site) -> None:
    _install(
        site,
        """
        import mixcompile as mc

        @mc.hookimpl
        def register_routers(register):
            register("topk_wrapped", mc.registry().get("router", "topk").factory)
        """,
    )
    with pytest.raises(
        mc.PluginError, match=r"^plugin 'acme' \(package 'acme-moe-tools' 1.0\) looked the reg"
    ):
        mc.registry()


def test_another_thread_may_look_the_registry_up_while_a_hook_runs(fresh_registry) -> None:
    """The guard is the hook's thread's: a registry built already serves other threads meanwhile."""
    found = []

    class Waits:
        @mc.hookimpl
        def register_routers(self, register):
            thread = threading.Thread(target=lambda: found.append(mc.registry().names("router")))
            thread.start()
            thread.join()
            register("waited", mc.LearnedRouter)

    mc.registry()
    mc.register_plugin(Waits(), name="waits")
    assert "topk" in found[0] and "waited" in mc.registry().names("router")


# -- mixcompile plugins ------------------------------------------------------------------------------------


def test_plugins_lists_the_package_of_each_plugin(site, capsys) -> None:
    _install(site, GOOD)
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "PLUGIN", "PACKAGE", "DESCRIPTION"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    assert rows[("router", "sharp")] == [
        "router",
        "sharp",
        "acme",
        "acme-moe-tools",
        "1.0",
        "a",
        "sharp",
        "router",
    ]
    assert rows[("router", "topk")][2:4] == ["mixcompile_plugins.routers", "mixcompile"]
    assert main(["plugins", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out) if e["kind"] == "router"}
    assert listed["sharp"] == {
        "kind": "router",
        "name": "sharp",
        "plugin": "acme",
        "package": "acme-moe-tools",
        "version": "1.0",
        "description": "a sharp router",
    }
    assert listed["topk"]["package"] == "mixcompile"


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_plugins_with_a_broken_plugin_names_its_package_in_one_line(site, capsys, as_json) -> None:
    """No partial listing, which would look complete: the error says which package and how to leave it out."""
    _install(site, BROKEN["raises in its hook"][0])
    assert main(["plugins", *as_json]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "mixcompile: error: plugin 'acme' (package 'acme-moe-tools' 1.0) raised in hook register_kernels: "
        "RuntimeError: no GPU here. Until it is fixed, uninstall package 'acme-moe-tools' 1.0, or leave it "
        "out with MIXCOMPILE_PLUGINS=none."
    ]


# -- mc.warn from a namespace package ----------------------------------------------------------------------


def test_a_warning_from_a_plugin_in_a_namespace_package_points_at_the_users_line(fresh_registry, tmp_path):
    """A namespace package (no __init__.py) has no __file__: its frames were not skipped, so the warning
    pointed at the plugin's own line."""
    package = tmp_path / "diag_ns" / "warnplug"  # diag_ns has no __init__.py
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import mixcompile as mc

            class Noisy(mc.LearnedRouter):
                def forward(self, x, kernel):
                    mc.warn("namespaced router says hello")
                    probs, chosen, weights = kernel.topk_routing(self.logits(x), self.top_k)
                    return self.token_choice_plan(self.logits(x), chosen, weights, probs)

            @mc.hookimpl
            def register_routers(register):
                register("ns_noisy", Noisy)
            """
        )
    )
    fresh_registry.syspath_prepend(str(tmp_path))
    try:
        import diag_ns.warnplug

        assert getattr(sys.modules["diag_ns"], "__file__", None) is None  # a namespace package indeed
        mc.register_plugin(diag_ns.warnplug, name="tests.ns_noisy")
        block = mc.MoEBlock(4, 8, 3, top_k=2, router="ns_noisy")
        with pytest.warns(UserWarning, match="namespaced router says hello") as said:
            block(torch.randn(5, 4))
    finally:
        for name in [m for m in sys.modules if m.startswith("diag_ns")]:
            del sys.modules[name]
    assert [w.filename for w in said] == [__file__]


def test_an_entry_point_named_twice_in_the_selection_loads_once(site, fresh_registry) -> None:
    """MIXCOMPILE_PLUGINS=acme,acme loaded it twice, and the second time blamed it for registering its own
    names again ("already registered")."""
    _install(site, GOOD)
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "acme, acme")
    manager.reset()
    assert "sharp" in mc.registry().names("router")


def test_a_plugin_left_out_by_the_selection_is_not_credited_to_its_package(site, fresh_registry) -> None:
    """A plugin registered in-process under the name of an installed entry point that MIXCOMPILE_PLUGINS
    left out was recorded (and listed) as that package's."""
    from mixcompile.plugins.providers import installed_providers

    _install(site, GOOD)
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "none")
    manager.reset()

    class Mine:
        @mc.hookimpl
        def register_routers(self, register):
            register("mine", mc.LearnedRouter)

    mc.register_plugin(Mine(), name="acme")
    try:
        provided = installed_providers({"router:mine": ("router", "mine")})
        assert provided.get("router:mine", {}).get("package") != "acme-moe-tools"
    finally:
        mc.unregister_plugin("acme")


KERNEL = """
    import mixcompile as mc

    class Loop(mc.Kernel):
        def supports(self, kind, device, dtype):
            return True

        def moe(self, x, plan, experts):
            return mc.registry().get("kernel", "torch").factory().moe(x, plan, experts)

    @mc.hookimpl
    def register_kernels(register):
        register("loop", Loop)
"""


def test_a_kernel_set_on_a_block_is_recorded_with_its_package(site, fresh_registry, tmp_path) -> None:
    """Saved as a block setting, the kernel was not among the manifest's plugins: a load without it said
    "unknown kernel" with no package to install."""
    _install(site, KERNEL)
    model = mc.convert(mc.build_tiny_gpt(d_model=16, n_layer=1, n_head=2, d_ff=32, max_seq=8), num_experts=2)
    first, *_ = mc.sparse_blocks(model).values()
    first.kernel = "loop"
    mc.save(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "mixcompile.json").read_text())
    assert saved["plugins"]["kernel:loop"] == {"package": "acme-moe-tools", "version": "1.0"}
    fresh_registry.setenv("MIXCOMPILE_PLUGINS", "none")
    manager.reset()
    with pytest.raises(
        mc.LoadError,
        match=r"unknown kernel 'loop'.* It was provided by package 'acme-moe-tools' 1\.0 when the model was "
        r"saved; version 1\.0 of it is installed here but does not register it: MIXCOMPILE_PLUGINS='none'",
    ):
        mc.load(tmp_path / "m")


def test_a_package_named_otherwise_in_its_record_is_the_same_package(site, fresh_registry) -> None:
    """Distribution names compare as packaging compares them: 'Acme_Moe_Tools' is 'acme-moe-tools'."""
    from mixcompile.plugins.providers import changed_providers

    _install(site, GOOD)
    assert changed_providers({"router:sharp": {"package": "Acme_Moe_Tools", "version": "1.0"}}) == []
    assert changed_providers({"router:sharp": {"package": "Acme_Moe_Tools", "version": "0.9"}}) == [
        "router 'sharp' comes from package 'acme-moe-tools' 1.0, not 0.9"
    ]
