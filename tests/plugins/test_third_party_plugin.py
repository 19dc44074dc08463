"""The example plugin package, pip-installed for real, is usable by name like a built-in router."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixcompile as mc
import mixcompile.plugins.manager as registry
from mixcompile.cli.main import main

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "third_party_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """``pip install`` a copy of the example (builds write beside the sources) into a private folder."""
    source = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(PACKAGE, source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    sys.path.insert(0, str(target))
    registry.reset()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("mixcompile_cosine", None)
    registry.reset()


def test_installed_router_is_found_through_its_entry_point(installed_plugin):
    entry = mc.registry().get("router", "cosine")
    assert entry.plugin == "cosine"
    assert "X-MoE" in entry.description


def test_installed_router_routes_and_learns(installed_plugin):
    torch.manual_seed(0)
    block = mc.MoEBlock(16, 32, 4, top_k=2, router="cosine", router_options={"temperature": 0.5})
    x = torch.randn(3, 5, 16)
    y = block(x)
    assert y.shape == x.shape
    assert mc.stats(block)[""]["expert_load"].sum() == 30
    (y.square().sum() + mc.aux_loss(block)).backward()
    assert block.router.log_temperature.grad is not None and block.router.log_temperature.grad != 0
    assert all(p.grad is not None for p in block.router.parameters())  # no unused gate (DDP refuses those)
    jittery = mc.MoEBlock(16, 32, 4, router="cosine", router_options={"jitter": 0.5}).router
    tokens = torch.randn(6, 16)
    assert not torch.equal(jittery.logits(tokens), jittery.logits(tokens))  # the inherited jitter, training
    jittery.eval()
    assert torch.equal(jittery.logits(tokens), jittery.logits(tokens))
    with pytest.raises(mc.ConfigError, match=r"router 'cosine' \(plugin 'cosine'\): temperature must be > 0"):
        mc.MoEBlock(16, 32, 4, router="cosine", router_options={"temperature": 0})


def test_a_model_saved_with_it_names_its_package_when_loaded_without_it(
    installed_plugin, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    model = mc.convert(
        mc.build_tiny_gpt(d_model=16, n_layer=1, n_head=2, d_ff=32), num_experts=4, router="cosine"
    )
    mc.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "mixcompile.json").read_text())
    assert manifest["plugins"]["router:cosine"] == {"package": "mixcompile-cosine", "version": "0.1.0"}
    assert manifest["plugins"]["initializer:upcycle"]["package"] == "mixcompile"
    monkeypatch.setenv("MIXCOMPILE_PLUGINS", "none")
    registry.reset()
    try:
        with pytest.raises(
            mc.LoadError, match=r"unknown router here, 'cosine'.*package 'mixcompile-cosine' 0\.1\.0"
        ):
            mc.load(tmp_path / "m")
    finally:
        monkeypatch.delenv("MIXCOMPILE_PLUGINS")
        registry.reset()
    loaded = mc.load(tmp_path / "m")
    tokens = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(loaded.eval()(tokens), model.eval()(tokens), rtol=0, atol=0)


class _Alias:
    """A plugin (of no installed package: this test module) registering a class mixcompile ships."""

    @mc.hookimpl
    def register_routers(self, register: mc.RouterRegister) -> None:
        from mixcompile_plugins.routers import TopKRouter

        register("topk_alias", TopKRouter)


def test_the_manifest_names_the_plugins_package_not_its_factorys(tmp_path) -> None:
    mc.register_plugin(_Alias(), name="alias_plugin")
    try:
        model = mc.convert(
            mc.build_tiny_gpt(d_model=16, n_layer=1, n_head=2, d_ff=32), num_experts=4, router="topk_alias"
        )
        mc.save(model, tmp_path / "m")
    finally:
        mc.unregister_plugin("alias_plugin")
    plugins = json.loads((tmp_path / "m" / "mixcompile.json").read_text())["plugins"]
    assert "router:topk_alias" not in plugins  # not 'mixcompile', whose TopKRouter it registered
    assert plugins["initializer:upcycle"]["package"] == "mixcompile"


def test_its_readme_shows_what_mixcompile_plugins_prints(installed_plugin, capsys) -> None:
    readme = (PACKAGE / "README.md").read_text()
    shown = readme.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert main(["plugins"]) == 0
    listed = [line.split() for line in shown if line != "..."]  # the first lines, as far as spacing goes
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert printed[: len(listed)] == listed
