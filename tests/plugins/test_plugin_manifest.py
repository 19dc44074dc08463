"""A saved manifest names every plugin its model needs, patterns and builders included, so that loading
where one is missing names it and the package to install."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from distributions import write_distribution
from torch import nn

import mixcompile as mc
import mixcompile.plugins.manager as manager

PATTERN_MODULE = """
    import operator

    import mixcompile as mc
    from mixcompile.compiler import ACT, LINEAR, OTHER, TemplatePattern, chain


    class ScaledMLP(TemplatePattern):
        '''down(act(up(x)) * c) for a Python number c, folded into w_out.'''

        name = "scaled_mlp"

        def templates(self):
            return [chain(("up", LINEAR), ("act", ACT), ("mul", OTHER), ("down", LINEAR))]

        def to_ffn(self, roles, view):
            mul = roles["mul"]
            numbers = [a for a in mul.args if isinstance(a, int | float)]
            if mul.target is not operator.mul or len(numbers) != 1:
                return None
            w_in, b_in = view.linear_weights(roles["up"])
            w_out, b_out = view.linear_weights(roles["down"])
            activation = view.activation(roles["act"])
            return mc.DenseFFN(w_in, w_out * numbers[0], activation, b_in=b_in, b_out=b_out)


    def build_scaled(d: int = 16, h: int = 32):
        import torch

        class Scaled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.up, self.act, self.down = torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, d)

            def forward(self, x):
                return x + self.down(self.act(self.up(x)) * 0.5)

        return torch.nn.Sequential(Scaled())  # the FFN in a module of its own, which a block replaces


    @mc.hookimpl
    def register_patterns(register):
        register("scaled_mlp", ScaledMLP)


    @mc.hookimpl
    def register_builders(register):
        register("scaled", build_scaled)
"""


@pytest.fixture
def scaled_plugin(fresh_registry, tmp_path):
    """The pattern and builder above as an installed distribution, 'scaled-plugin' 1.0, whose entry point
    is its module."""
    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, "scaled-plugin", "scaled = scaled_plugin", "scaled_plugin", PATTERN_MODULE)
    fresh_registry.syspath_prepend(str(site))
    yield fresh_registry
    sys.modules.pop("scaled_plugin", None)


def _without_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXCOMPILE_PLUGINS", "none")
    manager.reset()


def _plugins(directory: Path) -> dict[str, dict[str, str]]:
    plugins: dict[str, dict[str, str]] = json.loads((directory / "mixcompile.json").read_text())["plugins"]
    return plugins


def _scaled_base() -> nn.Module:
    return mc.registry().get("builder", "scaled").factory(d=16, h=32)


def _saved_scaled_model(directory: Path) -> nn.Module:
    torch.manual_seed(0)
    model = mc.convert(_scaled_base(), num_experts=4)  # its FFN is found by the plugin's pattern only
    mc.save(model, directory, base={"kind": "builder", "name": "scaled", "kwargs": {"d": 16, "h": 32}})
    return model


def test_the_pattern_and_builder_of_a_saved_model_are_recorded_with_their_package(
    scaled_plugin, tmp_path
) -> None:
    _saved_scaled_model(tmp_path / "m")
    plugins = _plugins(tmp_path / "m")
    assert plugins["pattern:scaled_mlp"] == {"package": "scaled-plugin", "version": "1.0"}
    assert plugins["builder:scaled"] == {"package": "scaled-plugin", "version": "1.0"}
    assert "pattern:mlp" not in plugins  # only the patterns that found a converted FFN
    tiny = mc.convert(mc.build_tiny_gpt(d_model=16, n_layer=1, n_head=2, d_ff=32), num_experts=4)
    mc.save(tiny, tmp_path / "tiny")
    assert _plugins(tmp_path / "tiny")["pattern:mlp"]["package"] == "mixcompile"
    assert _plugins(tmp_path / "tiny")["builder:tiny_gpt"]["package"] == "mixcompile"


def test_loading_without_the_pattern_names_it_and_its_package(scaled_plugin, tmp_path) -> None:
    model = _saved_scaled_model(tmp_path / "m")
    base = _scaled_base()
    _without_plugins(scaled_plugin)
    missing = (
        r"found by the pattern 'scaled_mlp', which no installed plugin registers here \(known: "
        r"fused_gated_mlp, gated_mlp, mlp\)\. It was provided by package 'scaled-plugin' 1\.0 when the "
        r"model was saved"
    )
    with pytest.raises(
        mc.LoadError,  # installing it would not help: it is installed, and left out
        match=rf"{missing}; version 1\.0 of it is installed here but does not register it: "
        r"MIXCOMPILE_PLUGINS='none' leaves its entry point out \(`mixcompile plugins` lists what is loaded\)",
    ):
        mc.load(tmp_path / "m", base=base)
    site = sys.path[0]
    scaled_plugin.setattr(sys, "path", sys.path[1:])  # uninstalled
    importlib.invalidate_caches()
    with pytest.raises(mc.LoadError, match=rf"{missing}: install that"):
        mc.load(tmp_path / "m", base=base)
    scaled_plugin.setattr(sys, "path", [site, *sys.path])
    importlib.invalidate_caches()
    scaled_plugin.delenv("MIXCOMPILE_PLUGINS")
    manager.reset()
    x = torch.randn(2, 3, 16)
    loaded = mc.load(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    mc.save(loaded, tmp_path / "again")  # the replay that loaded it records its patterns again
    assert _plugins(tmp_path / "again")["pattern:scaled_mlp"]["package"] == "scaled-plugin"


def test_a_missing_builder_is_named_with_its_package_when_the_patterns_are_there(
    scaled_plugin, tmp_path
) -> None:
    """Only the builder is missing: the manifest names the plugin's builder, but the converted FFN is a
    plain MLP, which the built-in pattern finds. (Written by hand: save refuses a base that does not
    rebuild the model, as the plugin's builder would not.)"""
    plain = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    mc.save(mc.convert(plain, num_experts=4), tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "mixcompile.json").read_text())
    base = manifest["base"] = {"kind": "builder", "name": "scaled", "kwargs": {"d": 16, "h": 32}}
    manifest["plugins"]["builder:scaled"] = {"package": "scaled-plugin", "version": "1.0"}
    (tmp_path / "m" / "mixcompile.json").write_text(json.dumps(manifest))
    _without_plugins(scaled_plugin)
    with pytest.raises(mc.LoadError) as raised:
        mc.load(tmp_path / "m")
    assert str(raised.value) == (
        "the base builder 'scaled' is not registered here (known: 'tiny_gpt'). It was provided by package "
        "'scaled-plugin' 1.0 when the model was saved; version 1.0 of it is installed here but does not "
        "register it: MIXCOMPILE_PLUGINS='none' leaves its entry point out (`mixcompile plugins` lists what "
        "is loaded)."
    )
    loaded = mc.load(tmp_path / "m", base=plain)  # a base given by hand needs no builder
    mc.save(loaded, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "mixcompile.json").read_text())
    assert saved["base"] == base  # what the first manifest said of the builder's package is not written


def _reinstall(site_of: pytest.MonkeyPatch, name: str, version: str, module: str = PATTERN_MODULE) -> None:
    """The plugin's distribution replaced by ``name`` ``version`` holding ``module``, in the fixture's
    site folder (the first entry of sys.path)."""
    site = Path(sys.path[0])
    for info in site.glob("*.dist-info"):
        shutil.rmtree(info)
    write_distribution(site, name, "scaled = scaled_plugin", "scaled_plugin", module, version)
    sys.modules.pop("scaled_plugin", None)
    importlib.invalidate_caches()
    manager.reset()


@pytest.mark.parametrize(
    ("name", "version", "said"),
    [
        ("scaled-plugin", "1.1", "comes from package 'scaled-plugin' 1.1, not 1.0"),
        ("other-plugin", "2.0", "comes from package 'other-plugin' 2.0, not package 'scaled-plugin' 1.0"),
    ],
)
def test_a_plugin_provided_otherwise_than_at_the_save_is_said_at_load(
    scaled_plugin, tmp_path, name, version, said
) -> None:
    """The same names from another package, or another version of it, loaded without a word: what they
    compute may differ (a changed default), and an error of the load did not say what had changed."""
    model = _saved_scaled_model(tmp_path / "m")
    _reinstall(scaled_plugin, name, version)
    with pytest.warns(
        UserWarning,
        match=rf"since the model was saved, builder 'scaled' {said}; pattern "
        rf"'scaled_mlp' {said}: the loaded model may compute something else",
    ):
        loaded = mc.load(tmp_path / "m")
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)  # here, nothing did
    wider = PATTERN_MODULE.replace("Linear(d, h)", "Linear(d, 2 * h)").replace(
        "Linear(h, d)", "Linear(2 * h, d)"
    )
    _reinstall(scaled_plugin, name, version, wider)
    with pytest.raises(
        mc.LoadError, match=rf"of another shape.* Since the model was saved, builder 'scaled' {said}"
    ):
        mc.load(tmp_path / "m")


def _run_in_process() -> dict[str, Any]:
    """The plugin module above run in this process: no installed package provides what it holds."""
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(PATTERN_MODULE), namespace)
    return namespace


IN_PROCESS = _run_in_process()


class _InProcessPattern:
    @mc.hookimpl
    def register_patterns(self, register: mc.PatternRegister) -> None:
        register("scaled_mlp", IN_PROCESS["ScaledMLP"])


def _in_a_model() -> nn.Module:
    return IN_PROCESS["build_scaled"]()


def test_an_in_process_pattern_is_not_recorded_and_missing_at_load_lists_the_registered_ones(
    fresh_registry, tmp_path
) -> None:
    """Of no package, it has no entry the mixcompile versions before patterns were recorded could read
    (they refuse an entry without a package): a load without it finds no FFN and says which it knows."""
    mc.register_plugin(_InProcessPattern(), name="tests.scaled_pattern")
    mc.save(mc.convert(_in_a_model(), num_experts=4), tmp_path / "m")
    assert "pattern:scaled_mlp" not in _plugins(tmp_path / "m")
    assert all("package" in provider for provider in _plugins(tmp_path / "m").values())
    mc.unregister_plugin("tests.scaled_pattern")
    missing = r"no FFN found .* registered patterns \(fused_gated_mlp, gated"
    with pytest.raises(mc.MixcompileError, match=missing):
        mc.load(tmp_path / "m", base=_in_a_model)


def test_no_ffn_found_lists_the_registered_patterns(fresh_registry) -> None:
    mc.register_plugin(_InProcessPattern(), name="tests.scaled_pattern")
    with pytest.raises(
        mc.ConfigError,
        match=r"nothing matched the registered patterns \(fused_gated_mlp, gated_mlp, mlp, scaled_mlp\)",
    ):
        mc.convert(nn.Sequential(nn.Linear(16, 16)), num_experts=4)
