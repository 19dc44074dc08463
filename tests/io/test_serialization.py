"""``mixcompile.save`` / ``mixcompile.load`` as a library: exact round trips, models converted twice, and
refusals that leave the files as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mixcompile as mc
from mixcompile import ConfigError, LoadError, build_tiny_gpt

TINY = {"d_model": 32, "n_layer": 4, "n_head": 2, "d_ff": 64, "max_seq": 16}


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (4, 12))


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_round_trip_rebuilds_the_recorded_base(tmp_path: Path) -> None:
    model = mc.convert(
        build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2, init_options={"noise": 0.1}
    )
    with torch.no_grad():  # weights that differ from any fresh conversion
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    mc.save(model, tmp_path / "moe")
    assert_same_outputs(model, mc.load(tmp_path / "moe"), tokens())


def test_loaded_weights_lie_where_torch_would_allocate_them(tmp_path: Path) -> None:
    """safetensors 0.8 hands tensors back at any address, where CPU BLAS rounds some products otherwise:
    a loaded Qwen2-MoE's logits differed from the saved model's in the last bit."""
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2)
    mc.save(model, tmp_path / "moe")
    loaded = mc.load(tmp_path / "moe")
    assert [name for name, t in loaded.state_dict().items() if t.data_ptr() % 64] == []
    assert_same_outputs(model, loaded, tokens())


@pytest.mark.parametrize("strategy", ["moe", "mot"])
def test_a_kernel_set_after_conversion_is_saved(tmp_path: Path, strategy: str) -> None:
    """``block.kernel = ...`` was not saved: the loaded blocks ran the recipe's kernel again."""
    options = {"group_size": 2} if strategy == "mot" else {"top_k": 1}
    model = mc.convert(build_tiny_gpt(**TINY), strategy=strategy, num_experts=4, kernel="torch", **options)
    mc.save(model, tmp_path / "as_converted")
    saved = json.loads((tmp_path / "as_converted" / "mixcompile.json").read_text()).get("blocks", {})
    assert all("kernel" not in settings for settings in saved.values())  # unchanged: not a setting
    first, *_ = mc.sparse_blocks(model).values()
    first.kernel = "auto"
    mc.save(model, tmp_path / "m")
    loaded = mc.load(tmp_path / "m")
    assert [block.kernel for block in mc.sparse_blocks(loaded).values()] == [
        "auto",
        "torch",
        "torch",
        "torch",
    ]
    assert_same_outputs(model, loaded, tokens())


def test_a_block_pickled_before_its_recipes_kernel_was_kept_saves_its_kernel() -> None:
    """Its recipe's kernel is unknown: the kernel it runs is saved whatever it is (it was never saved)."""
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=1, kernel="torch")
    first, *_ = mc.sparse_blocks(model).values()
    del first._recipe_kernel  # as unpickled from before it existed
    first.kernel = "auto"
    assert first.settings() == {"kernel": "auto"}


def test_a_kernel_set_before_a_token_choice_switch_is_saved(tmp_path: Path) -> None:
    model = mc.convert(build_tiny_gpt(**TINY), strategy="mot", num_experts=4, group_size=2, kernel="torch")
    first, *_ = mc.sparse_blocks(model).values()
    first.kernel = "auto"
    mc.to_token_choice(model, top_k=2)
    mc.save(model, tmp_path / "m")
    loaded = mc.load(tmp_path / "m")
    blocks = mc.sparse_blocks(loaded).values()
    assert [(type(b).__name__, b.kernel) for b in blocks] == [("MoEBlock", "auto")] + [
        ("MoEBlock", "torch")
    ] * 3
    assert_same_outputs(model, loaded, tokens())


def test_a_model_converted_twice_round_trips(tmp_path: Path) -> None:
    moe = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=1, sites=[0, 1])
    hybrid = mc.convert(moe, strategy="mot", num_experts=4, group_size=2, init="random", sites="all")
    mc.save(hybrid, tmp_path / "hybrid")
    manifest = json.loads((tmp_path / "hybrid" / "mixcompile.json").read_text())
    assert [r["strategy"] for r in manifest["recipes"]] == ["moe", "mot"]
    loaded = mc.load(tmp_path / "hybrid")
    kinds = [type(b).__name__ for b in mc.sparse_blocks(loaded).values()]
    assert kinds == ["MoEBlock", "MoEBlock", "MoTBlock", "MoTBlock"]
    assert_same_outputs(hybrid, loaded, tokens())


def test_inspect_describes_the_blocks_a_model_already_has() -> None:
    moe = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=1, sites=[0, 1])
    report = mc.inspect(moe)
    assert [b.path for b in report.sparse_blocks] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert {(b.kind, b.num_experts, b.top_k, b.kernel) for b in report.sparse_blocks} == {
        ("moe", 4, 1, "torch")
    }
    assert not [path for path in report.untraced if path.startswith("blocks.0.mlp")]
    assert [s.path for s in report.sites] == ["blocks.2.mlp", "blocks.3.mlp"]
    dense_ffn = 2 * 32 * 64 * 2
    moe_block = 2 * 32 * 4 + dense_ffn  # router + one expert of the same size
    assert report.ffn_flops_before == 2 * moe_block + 2 * dense_ffn
    assert "Sparse blocks already in the model" in str(report)
    assert "blocks.0.mlp" + " " * 33 + "moe  4 experts 32x64, router topk, top-1" in str(report)
    mot = mc.inspect(mc.convert(build_tiny_gpt(**TINY), strategy="mot", num_experts=4, group_size=2))
    assert {(b.kind, b.mixer, b.router) for b in mot.sparse_blocks} == {("mot", "softmax", None)}
    assert "mixer softmax, groups of 2" in str(mot)
    fully = mc.inspect(mc.convert(moe, strategy="moe", num_experts=4))
    assert fully.sites == [] and len(fully.sparse_blocks) == 4
    assert str(fully).startswith(
        "mixcompile report for TinyGPT: no dense FFN sites; already sparse: 4 blocks"
    )


def test_a_model_built_in_python_needs_its_base(tmp_path: Path) -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

    torch.manual_seed(0)
    model = mc.convert(build(), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, tmp_path / "mine")
    with pytest.raises(LoadError, match=r"base=build_my_model"):
        mc.load(tmp_path / "mine")
    assert_same_outputs(model, mc.load(tmp_path / "mine", base=build), torch.randn(5, 8))
    with pytest.raises(TypeError, match="base must be an nn.Module"):
        mc.load(tmp_path / "mine", base=lambda: "not a model")


def test_an_imported_builder_outside_mixcompile_needs_trust_code(tmp_path: Path) -> None:
    from zoo import plain_mlp

    model = mc.convert(plain_mlp(), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, tmp_path / "m", base={"kind": "import", "target": "zoo:plain_mlp", "kwargs": {}})
    with pytest.raises(LoadError, match="trust_code=True"):
        mc.load(tmp_path / "m")
    x = torch.randn(3, 5, 32)
    model.eval()
    torch.testing.assert_close(mc.load(tmp_path / "m", trust_code=True).eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("target", "kwargs", "said"),
    [
        ("zoo.plain_mlp", {}, "'target' must look like 'package.module:function'"),
        ("zoo:no_such_builder", {}, "cannot import the base builder 'zoo:no_such_builder'"),
        ("zoo:plain_mlp", {"width": 4}, r"does not take the kwargs \{'width': 4\}: .*unexpected keyword"),
        ("zoo:gated_mlp", {}, "the model it builds does not fit this model.s weights"),  # another model
    ],
)
def test_a_base_spec_that_would_not_load_is_refused_by_save(
    tmp_path: Path, monkeypatch, target, kwargs, said
) -> None:
    """Each of these was written, and only the load failed (a misspelt kwarg with a bare TypeError). The
    check runs in memory, before a weight is written."""
    from zoo import plain_mlp

    from mixcompile.io import saving

    monkeypatch.setattr(saving, "write_model", lambda *args: pytest.fail("written before the check"))
    model = mc.convert(plain_mlp(), strategy="moe", num_experts=2, top_k=1)
    base = {"kind": "import", "target": target, "kwargs": kwargs}
    with pytest.raises(
        ConfigError, match=rf"^base=.* does not rebuild this model \(a load would fail\): .*{said}"
    ):
        mc.save(model, tmp_path / "m", base=base)
    assert list(tmp_path.iterdir()) == []  # nothing written


def _meta_hostile_builder() -> nn.Module:
    """Reads a weight's value (to log it, say): fine eagerly, not on the meta device (a skeleton)."""
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    print(f"built, first weight norm {float(model[0].weight.norm()):.3f}")
    return model


def test_a_base_spec_whose_builder_fails_on_meta_is_refused_naming_it(tmp_path: Path) -> None:
    """It escaped save as a bare RuntimeError from inside the builder."""
    model = mc.convert(_meta_hostile_builder(), strategy="moe", num_experts=2, top_k=1)
    base = {"kind": "import", "target": f"{__name__}:_meta_hostile_builder", "kwargs": {}}
    said = r"^base=.* does not rebuild this model .*building it raised RuntimeError"
    with pytest.raises(ConfigError, match=said):
        mc.save(model, tmp_path / "m", base=base)
    assert list(tmp_path.iterdir()) == []


class _TiedNet(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + self.mlp(h))


def _untied_net() -> nn.Module:
    return _TiedNet(tie=False)


def test_a_base_spec_that_unties_the_models_tied_weights_is_refused_by_save(tmp_path: Path) -> None:
    """The file keeps one name of a tied tensor, so a load of a base that unties it misses the other; the
    check in memory compared every name the model has and let it through."""
    model = mc.convert(_TiedNet(tie=True), strategy="moe", num_experts=2, top_k=1)
    base = {"kind": "import", "target": f"{__name__}:_untied_net", "kwargs": {}}
    with pytest.raises(ConfigError, match=r"does not fit this model's weights: missing 1 tensors, first"):
        mc.save(model, tmp_path / "m", base=base)
    assert list(tmp_path.iterdir()) == []


def test_checking_a_base_spec_warns_nothing_convert_warned_already(tmp_path: Path, recwarn) -> None:
    """The check replays the recipe: convert's warnings (expert choice on a model that generates) came
    again from save."""
    with pytest.warns(UserWarning, match="is not causal"):
        model = mc.convert(build_tiny_gpt(**TINY), num_experts=2, top_k=1, router="expert_choice")
    recwarn.clear()
    base = {"kind": "import", "target": "mixcompile:build_tiny_gpt", "kwargs": TINY}
    mc.save(model, tmp_path / "m", base=base)
    assert [str(w.message) for w in recwarn] == []


def test_a_base_spec_held_by_a_model_an_earlier_load_made_is_written_without_its_provider(tmp_path) -> None:
    """An earlier mc.load kept the builder's package in memory as 'provided_by' (a pickled model still
    has it): written into the manifest, the directory did not load ("unexpected fields")."""
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    model.mixcompile_base = {**model.mixcompile_base, "provided_by": "package 'mixcompile' 0.1.0"}
    mc.save(model, tmp_path / "m")
    assert "provided_by" not in json.loads((tmp_path / "m" / "mixcompile.json").read_text())["base"]
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(mc.load(tmp_path / "m").eval()(tokens), model.eval()(tokens), rtol=0, atol=0)


def test_a_misspelt_kwarg_of_an_imported_builder_is_a_load_error(tmp_path: Path) -> None:
    """A manifest edited (or written by an older save) to pass a kwarg its builder lacks."""
    from zoo import plain_mlp

    model = mc.convert(plain_mlp(), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, tmp_path / "m", base={"kind": "import", "target": "zoo:plain_mlp", "kwargs": {}})
    manifest = json.loads((tmp_path / "m" / "mixcompile.json").read_text())
    manifest["base"]["kwargs"] = {"widht": 4}
    (tmp_path / "m" / "mixcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match=r"'zoo:plain_mlp' does not take the kwargs \{'widht': 4\}"):
        mc.load(tmp_path / "m", trust_code=True)


def test_existing_directory_is_refused_and_left_intact(tmp_path: Path) -> None:
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mc.save(model, target)
    with pytest.raises(FileExistsError, match="not a model directory"):  # overwrite replaces only models
        mc.save(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (target / "keep.txt").unlink()
    mc.save(model, target, overwrite=True)  # an empty directory has nothing to lose
    mc.save(model, target, overwrite=True)  # and a model directory is replaced
    assert sorted(p.name for p in target.iterdir()) == ["mixcompile.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_an_unconverted_model_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(mc.ConfigError, match="convert it first"):
        mc.save(build_tiny_gpt(**TINY), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    with pytest.raises(TypeError, match="nn.Module"):
        mc.save({"w": torch.zeros(1)}, tmp_path / "dict")


def test_a_manifest_without_recipes_is_a_clear_error(tmp_path: Path) -> None:
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1), tmp_path / "m")
    manifest_file = tmp_path / "m" / "mixcompile.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["recipes"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="no 'recipes' section"):
        mc.load(tmp_path / "m")


@pytest.mark.parametrize(
    ("saved", "meant"),
    [
        ({"renormalize": "False"}, {"renormalize": True}),  # what --router-option renormalize=False wrote
        ({"renormalize": 0}, {"renormalize": False}),
        (
            {"bias_balancing": "yes", "bias_update_rate": 0.01},
            {"bias_balancing": True, "bias_update_rate": 0.01},
        ),
        ({"bias_update_rate": 0.01}, {}),  # ignored without balancing
    ],
)
def test_router_options_an_earlier_version_saved_load_as_it_read_them(
    tmp_path: Path, saved: dict, meant: dict
) -> None:
    """Options refused for new recipes since e8ab23c (on/off options not bools; a balancing rate without
    balancing) were read by truthiness, or ignored, by the version that saved them: such a model loads
    computing what it computed, with a warning saying what was read."""
    recipe = {"strategy": "moe", "num_experts": 2, "top_k": 2, "router": "topk", "seed": 3}
    mc.save(mc.convert(build_tiny_gpt(**TINY), **recipe, router_options=meant), tmp_path / "m")
    manifest_file = tmp_path / "m" / "mixcompile.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["recipes"][0]["router_options"] = saved  # as an earlier version wrote it
    manifest_file.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="as the mixcompile that saved it did") as said:
        loaded = mc.load(tmp_path / "m")
    assert {w.filename for w in said} == {__file__}  # the line calling load
    want = mc.convert(build_tiny_gpt(**TINY), **recipe, router_options=meant)
    want.load_state_dict(loaded.state_dict())
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(loaded(ids), want(ids), rtol=0, atol=0)
    router = next(m for m in loaded.modules() if isinstance(m, mc.MoEBlock)).router
    assert router.renormalize is meant.get("renormalize", True)
    assert router.bias_balancing is meant.get("bias_balancing", False)


def test_a_path_that_is_not_a_saved_model_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="nothing_here does not exist"):
        mc.load(tmp_path / "nothing_here")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(LoadError, match="weights.pt is a file; a saved model is the directory"):
        mc.load(tmp_path / "weights.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="empty is not a mixcompile directory: mixcompile.json is missing"):
        mc.load(tmp_path / "empty")


def test_a_compiled_model_is_saved_as_the_model_it_compiles(tmp_path: Path) -> None:
    """The README's workflow compiles the converted model; saving the wrapper must not record its
    ``_orig_mod.`` prefix (a directory no load could read)."""
    model = mc.convert(build_tiny_gpt(), strategy="moe", num_experts=4, top_k=2).eval()
    compiled = torch.compile(model)
    mc.save(compiled, tmp_path / "m")
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(mc.load(tmp_path / "m").eval()(tokens), model(tokens))
    assert list(mc.sparse_blocks(compiled)) == list(mc.sparse_blocks(model))  # paths without the prefix


@pytest.mark.parametrize("call", ["load", "save"])
def test_a_path_that_is_none_or_empty_is_refused_naming_it(tmp_path: Path, monkeypatch, call: str) -> None:
    """Path("") is the current directory: an empty string was read (or, overwrite=True, replaced) as it."""
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, tmp_path / "cwd")
    before = sorted(p.name for p in (tmp_path / "cwd").iterdir())
    monkeypatch.chdir(tmp_path / "cwd")
    use = (
        (lambda path: mc.load(path))
        if call == "load"
        else (lambda path: mc.save(model, path, overwrite=True))
    )
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        use(None)
    with pytest.raises(ConfigError, match="path is empty"):
        use("")
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]


class _TemperedRouter(mc.LearnedRouter):
    """A plugin's router with state changed after conversion: a persistent buffer and a plain attribute."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, **options: object) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        self.register_buffer("temperature", torch.ones(()))  # persistent: saved with the weights
        self.sharpness = 1.0  # a plain attribute: not saved

    def forward(self, x: torch.Tensor, kernel: mc.Kernel) -> mc.RoutingPlan:
        logits = self.logits(x) * self.sharpness / self.temperature
        probs, chosen, weights = kernel.topk_routing(logits, self.top_k, renormalize=False)
        return self.token_choice_plan(logits, chosen, weights, probs)


class _TemperedPlugin:
    @mc.hookimpl
    def register_routers(self, register: mc.RouterRegister) -> None:
        register("tempered", _TemperedRouter)


def test_plugin_state_changed_after_conversion_is_saved_in_buffers_not_attributes(
    fresh_registry, tmp_path: Path
) -> None:
    """What the README tells plugin authors: a value changed after construction is saved when it lives in
    a parameter or persistent buffer; a plain attribute comes back as the options made it."""
    mc.register_plugin(_TemperedPlugin(), name="tests.tempered")
    x = tokens()
    model = mc.convert(build_tiny_gpt(**TINY), num_experts=4, router="tempered").eval()
    for block in mc.sparse_blocks(model).values():
        block.router.temperature.fill_(0.25)
    mc.save(model, tmp_path / "buffer")
    loaded = mc.load(tmp_path / "buffer").eval()
    assert all(float(b.router.temperature) == 0.25 for b in mc.sparse_blocks(loaded).values())
    assert_same_outputs(loaded, model, x)
    for block in mc.sparse_blocks(model).values():
        block.router.sharpness = 3.0
    mc.save(model, tmp_path / "attribute")
    lost = mc.load(tmp_path / "attribute").eval()
    assert all(b.router.sharpness == 1.0 for b in mc.sparse_blocks(lost).values())
    with torch.no_grad():
        assert not torch.equal(lost(x), model(x))  # silently another model


class _SizedBuilder:
    @mc.hookimpl
    def register_builders(self, register: mc.BuilderRegister) -> None:
        def sized(size: str = "small") -> nn.Module:
            width = {"small": 16, "big": 32}[mc.check_choice("size", size, ("small", "big"))]
            return nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, width))

        register("sized", sized)


def test_a_builder_refusing_an_option_value_is_not_called_missing(fresh_registry, tmp_path: Path) -> None:
    """check_choice raises UnknownNameError: it read as 'the base builder is not registered here'."""
    mc.register_plugin(_SizedBuilder(), name="tests.sized")
    model = mc.convert(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)), num_experts=2, top_k=1)
    base = {"kind": "builder", "name": "sized", "kwargs": {"size": "smal"}}
    with pytest.raises(ConfigError) as raised:
        mc.save(model, tmp_path / "m", base=base)
    said = "could not be rebuilt: builder 'sized' (plugin 'tests.sized'): unknown size 'smal'. Did you mean"
    assert said in str(raised.value)
    assert "not registered" not in str(raised.value)
    mc.save(model, tmp_path / "m", base={**base, "kwargs": {"size": "small"}})  # the right value saves
    x = torch.randn(3, 16)
    torch.testing.assert_close(mc.load(tmp_path / "m").eval()(x), model.eval()(x), rtol=0, atol=0)
