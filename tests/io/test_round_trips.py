"""What you save is what you load, in every format: Hugging Face directories (save_pretrained too), dtypes,
deterministic conversions, every block option, structure-only (meta) conversion, untraceable inputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo import hf_qwen2_moe

import mixcompile as mc
from mixcompile.cli import main
from mixcompile.runtime.blocks import base as base_module
from mixcompile.runtime.kernels import get_kernel

transformers = pytest.importorskip("transformers")
TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "max_seq": 16}


def llama(**overrides) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def distinct_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Experts that differ from each other and from the dense FFN: a dense reload could not match them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in mc.sparse_blocks(model).values():
            for param in block.parameters():
                param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.05)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


# ---- Hugging Face directories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pretrained(tmp_path_factory):
    converted = distinct_experts(mc.convert(llama(), strategy="moe", num_experts=4, top_k=2))
    path = tmp_path_factory.mktemp("hf") / "converted"
    converted.save_pretrained(path)
    return path, converted


def test_save_pretrained_writes_a_directory_mixcompile_load_rebuilds_exactly(saved_pretrained) -> None:
    path, converted = saved_pretrained
    config = json.loads((path / "config.json").read_text())
    assert (
        config["model_type"] == "mixcompile" and config["mixcompile"]["base"]["class"] == "LlamaForCausalLM"
    )
    assert (path / "mixcompile_hf.py").is_file()
    loaded = mc.load(path)
    assert type(loaded) is type(converted) and len(mc.sparse_blocks(loaded)) == 2
    assert torch.equal(logits(loaded), logits(converted))


def test_auto_model_rebuilds_it_with_trust_remote_code_and_refuses_it_otherwise(saved_pretrained) -> None:
    path, converted = saved_pretrained
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(rebuilt) is type(converted) and len(mc.sparse_blocks(rebuilt)) == 2
    assert torch.equal(logits(rebuilt.eval()), logits(converted))


@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForSequenceClassification"])
def test_an_auto_class_for_another_head_is_refused_naming_the_one_that_loads(saved_pretrained, auto) -> None:
    """Not a LlamaForCausalLM handed back when another class was asked for."""
    path, _ = saved_pretrained
    wrong = "holds a converted LlamaForCausalLM.* load it with AutoModelForCausalLM"
    with pytest.raises(ValueError, match=wrong):
        getattr(transformers, auto).from_pretrained(path, trust_remote_code=True)


def test_an_index_an_unsharded_save_left_behind_is_ignored_as_transformers_ignores_it(
    tmp_path, capsys
) -> None:
    """save_pretrained(max_shard_size=...) then save_pretrained() into the same folder deletes the shards
    and keeps model.safetensors.index.json; transformers reads model.safetensors first."""
    dense, moe = llama(), mc.convert(llama(), num_experts=4).eval()
    for path, model in ((tmp_path / "dense", dense), (tmp_path / "moe", moe)):
        model.save_pretrained(path, max_shard_size="20KB")
        assert len(list(path.glob("model-*.safetensors"))) > 1
        model.save_pretrained(path)
        assert (path / "model.safetensors.index.json").exists() and not list(path.glob("model-*"))
    torch.testing.assert_close(logits(mc.load(tmp_path / "moe")), logits(moe), rtol=0, atol=0)
    args = [
        "convert",
        str(tmp_path / "dense"),
        "-o",
        str(tmp_path / "out"),
        "--strategy",
        "moe",
        "--experts",
        "4",
    ]
    assert main(args) == 0, capsys.readouterr().err
    torch.testing.assert_close(logits(mc.load(tmp_path / "out")), logits(dense))  # upcycled: dense


def test_a_converted_moe_model_saved_with_save_pretrained_loads_back(tmp_path) -> None:
    """transformers saves a MoE model's fused experts one tensor per expert (its original format) unless
    told not to; the converted model's directory keeps the tensors as the model holds them, so that both
    loaders find them."""
    model = distinct_experts(mc.convert(hf_qwen2_moe(), num_experts=4))
    model.save_pretrained(tmp_path / "m")
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    for loaded in (mc.load(tmp_path / "m"), rebuilt):
        assert torch.equal(logits(loaded.eval()), logits(model))
    with pytest.raises(ValueError, match="save_original_format=False"):
        model.save_pretrained(tmp_path / "other", save_original_format=True)


def test_the_cli_reads_it_as_the_converted_model(saved_pretrained, tmp_path, capsys) -> None:
    path, _ = saved_pretrained
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sites"] == [] and len(report["sparse_blocks"]) == 2
    assert main(["convert", str(path), "-o", str(tmp_path / "again"), "--strategy", "mot"]) == 0
    assert "nothing to convert" in capsys.readouterr().out  # every FFN is sparse already


def test_mixcompile_save_of_a_hf_model_is_refused_by_a_dense_reload_too(saved_pretrained, tmp_path) -> None:
    _, converted = saved_pretrained
    mc.save(converted, tmp_path / "saved")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=False)
    assert torch.equal(logits(mc.load(tmp_path / "saved")), logits(converted))


def test_weights_that_do_not_cover_the_model_are_refused_by_name(tmp_path, capsys) -> None:
    dense = llama()
    dense.save_pretrained(tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["inspect", str(tmp_path / "dense")]) == 1
    err = capsys.readouterr().err
    assert "missing 1, first 'model.layers.1.mlp.up_proj.weight'" in err and "model.layers.1.mlp.extra" in err


def test_weights_the_config_sizes_disagree_with_are_refused_with_both_shapes(tmp_path, capsys) -> None:
    """transformers 5 raises for a size mismatch pointing at a report the CLI silences: the user must see
    the tensor and both shapes, and no re-initialised weight may be kept."""
    llama().save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert main(["inspect", str(tmp_path / "dense")]) == 1
    err = capsys.readouterr().err
    assert "misshapen 6, first 'model.layers.0.mlp.down_proj.weight'" in err, err
    assert "[32, 64] in the file, [32, 96] in the model" in err and "refused" in err, err


# ---- dtypes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_survive_save_and_load(tmp_path, dtype) -> None:
    model = mc.convert(mc.build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2).to(dtype)
    mc.save(model, tmp_path / "tiny")
    loaded = mc.load(tmp_path / "tiny")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens), model.eval()(tokens))
    hf = mc.convert(llama().to(dtype), strategy="mot", num_experts=4, group_size=2, init="random")
    hf.save_pretrained(tmp_path / "hf")
    assert {p.dtype for p in mc.load(tmp_path / "hf").parameters()} == {dtype}


def test_the_cli_keeps_the_dtype_of_a_hugging_face_directory(tmp_path) -> None:
    llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["convert", str(tmp_path / "bf16"), "-o", str(tmp_path / "out"), "--strategy", "moe"]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}


# ---- determinism -----------------------------------------------------------------------------------------


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "recipe",
    [
        {"strategy": "moe", "router": "switch", "top_k": 1, "init_options": {"noise": 0.1}},
        {"strategy": "moe", "num_shared_experts": 1, "init": "split", "init_options": {"method": "random"}},
        {"strategy": "mot", "group_size": 2, "init": "random"},
    ],
)
def test_every_random_choice_comes_from_the_seed(recipe) -> None:
    dense = mc.build_tiny_gpt(**TINY)
    torch.manual_seed(123)
    first = _state(mc.convert(dense, num_experts=4, seed=7, **recipe))
    torch.manual_seed(456)  # another global RNG state: must not matter
    second = _state(mc.convert(dense, num_experts=4, seed=7, **recipe))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = _state(mc.convert(dense, num_experts=4, seed=8, **recipe))
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_the_same_cli_command_writes_byte_identical_weights(tmp_path) -> None:
    source = tmp_path / "dense.pt"
    torch.save(mc.build_tiny_gpt(**TINY), source)
    digests = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mixcompile",
                "convert",
                str(source),
                "-o",
                str(out),
                "--trust-pickle",
                "--strategy",
                "moe",
                "--experts",
                "4",
                "--router",
                "switch",
                "--top-k",
                "1",
                "--seed",
                "3",
                "--init-option",
                "noise=0.1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONHASHSEED": str(run)},
        )
        assert result.returncode == 0, result.stderr
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ---- every block option is a recipe option ---------------------------------------------------------------


class _CpuOnlyKernel(type(get_kernel("torch"))):
    def supports(self, kind, device, dtype):
        return device.type == "cpu"


class _CpuOnlyPlugin:
    @mc.hookimpl
    def register_kernels(self, register):
        register("cpu_only", _CpuOnlyKernel)


def test_a_model_converted_with_a_named_kernel_loads(tmp_path, monkeypatch) -> None:
    """Loading replays the recipe on the meta device, which a named kernel need not support (Triton does
    not): the kernel is checked where the weights are loaded to, not refused on the skeleton."""
    mc.register_plugin(_CpuOnlyPlugin(), name="cpu_only_plugin")
    try:
        torch.manual_seed(0)
        model = mc.convert(
            mc.build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2, kernel="cpu_only"
        )
        mc.save(model, tmp_path / "m")
        loaded = mc.load(tmp_path / "m")
        assert {b.kernel for b in mc.sparse_blocks(loaded).values()} == {"cpu_only"}
        tokens = torch.randint(0, 100, (2, 8))
        torch.testing.assert_close(loaded.eval()(tokens), model.eval()(tokens), rtol=0, atol=0)
        # chosen at load (weights assigned, not moved): a forward only looks the choice up
        resolved: list[str] = []
        real = base_module.resolve_kernel
        monkeypatch.setattr(
            base_module, "resolve_kernel", lambda name, *a, **k: resolved.append(name) or real(name, *a, **k)
        )
        loaded(tokens)
        assert resolved == []
    finally:
        mc.unregister_plugin("cpu_only_plugin")


def test_mot_mode_and_small_batch_are_recipe_options_saved_and_restored(tmp_path) -> None:
    model = mc.convert(
        mc.build_tiny_gpt(**TINY), strategy="mot", group_size=4, mode="sparse", small_batch="sparse"
    )
    assert {(b.mode, b.small_batch) for b in mc.sparse_blocks(model).values()} == {("sparse", "sparse")}
    mc.save(model, tmp_path / "m")
    loaded = mc.load(tmp_path / "m")
    assert {(b.mode, b.small_batch) for b in mc.sparse_blocks(loaded).values()} == {("sparse", "sparse")}
    with pytest.raises(mc.UnknownNameError, match="Did you mean 'sparse'"):
        mc.Recipe(strategy="mot", mode="sparce")
    with pytest.raises(mc.ConfigError, match="MoT option"):
        mc.Recipe(strategy="moe", small_batch="sparse")


def test_block_settings_changed_after_conversion_are_saved(tmp_path) -> None:
    model = mc.convert(mc.build_tiny_gpt(**TINY), strategy="mot", group_size=4, init="random")
    block = next(iter(mc.sparse_blocks(model).values()))
    block.small_batch, block.mixer.temperature = "sparse", 0.25  # as transition tuning leaves a model
    mc.save(model, tmp_path / "m")
    loaded = next(iter(mc.sparse_blocks(mc.load(tmp_path / "m")).values()))
    assert (loaded.small_batch, loaded.mixer.temperature) == ("sparse", 0.25)
    single = torch.randint(0, 256, (1, 8))  # batch 1 < G: the setting decides what is computed
    model.eval()
    with torch.no_grad():
        assert torch.equal(mc.load(tmp_path / "m").eval()(single), model(single))


def test_a_token_choice_switch_is_saved_and_replayed(tmp_path) -> None:
    """After ``to_token_choice`` (transition tuning's switch), ``save`` and ``save_pretrained`` record it:
    ``load`` and ``from_pretrained`` rebuild the MoT blocks from the recipe, switch them, then read the
    weights, and the outputs are the saved model's."""
    model = distinct_experts(mc.convert(llama(), strategy="mot", num_experts=4, group_size=2))
    assert mc.to_token_choice(model, top_k=3) == list(mc.sparse_blocks(model))
    distinct_experts(model)  # the routers' gates too: a fresh switch at load could not match them
    mc.save(model, tmp_path / "saved")
    model.save_pretrained(tmp_path / "pretrained")
    rebuilt = [
        mc.load(tmp_path / "saved"),
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained", trust_remote_code=True),
    ]
    for loaded in rebuilt:
        blocks = mc.sparse_blocks(loaded.eval())
        assert all(isinstance(b, mc.MoEBlock) and b.top_k == 3 and b.from_mot for b in blocks.values())
        assert torch.equal(logits(loaded), logits(model))
    manifest = json.loads((tmp_path / "saved" / "mixcompile.json").read_text())
    manifest["blocks"] = {path: {"token_choice": 3} for path in ("model.layers.0.self_attn", "nowhere")}
    (tmp_path / "saved" / "mixcompile.json").write_text(json.dumps(manifest))
    wrong = "switch is recorded at 'model.layers.0.self_attn', but the model has a LlamaAttention"
    with pytest.raises(mc.LoadError, match=wrong):
        mc.load(tmp_path / "saved")


def test_a_tiny_gpt_pickled_before_it_left_the_cli_package_still_unpickles(tmp_path) -> None:
    """TinyGPT lived in mixcompile.cli.tiny_gpt, and a pickle names its classes by module."""
    model = mc.build_tiny_gpt(**TINY)
    torch.save(model, tmp_path / "new.pt", _use_new_zipfile_serialization=False)  # plain pickle bytes
    pickled = (tmp_path / "new.pt").read_bytes()
    assert pickled.count(b"cmixcompile.models.tiny_gpt\n") == 3  # TinyGPT, Block, MLP
    (tmp_path / "old.pt").write_bytes(
        pickled.replace(b"cmixcompile.models.tiny_gpt\n", b"cmixcompile.cli.tiny_gpt\n")
    )
    loaded = torch.load(tmp_path / "old.pt", weights_only=False)
    assert type(loaded) is mc.TinyGPT
    want = model.state_dict()
    assert all(torch.equal(value, want[key]) for key, value in loaded.state_dict().items())


def test_cli_flags_reach_every_block_option(tmp_path) -> None:
    torch.save(mc.build_tiny_gpt(**TINY), tmp_path / "dense.pt")
    args = ["convert", str(tmp_path / "dense.pt"), "--trust-pickle", "--strategy"]
    assert (
        main(
            [
                *args,
                "mot",
                "-o",
                str(tmp_path / "mot"),
                "--mode",
                "sparse",
                "--small-batch",
                "sparse",
                "--layout",
                "batch_first",
                "--mixer-option",
                "temperature=0.5",
                "--mixer-option",
                "emit=experts",
            ]
        )
        == 0
    )
    recipe = json.loads((tmp_path / "mot" / "mixcompile.json").read_text())["recipes"][0]
    assert (recipe["mode"], recipe["small_batch"], recipe["layout"]) == ("sparse", "sparse", "batch_first")
    assert recipe["mixer_options"] == {"temperature": 0.5, "emit": "experts"}
    assert (
        main(
            [
                *args,
                "moe",
                "-o",
                str(tmp_path / "moe"),
                "--shared-experts",
                "1",
                "--router-option",
                "capacity_factor=1.25",
                "--router-option",
                "bias_balancing=true",
            ]
        )
        == 0
    )
    loaded = mc.load(tmp_path / "moe", trust_pickle=True)
    block = next(iter(mc.sparse_blocks(loaded).values()))
    assert block.router.capacity_factor == 1.25 and block.router.bias_balancing
    assert block.shared_experts.num_experts == 1


class TimeMajor(torch.nn.Module):
    """A residual FFN layer on ``[T, B, d]`` inputs that says nothing of its layout: only the recipe can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def time_major() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(TimeMajor(), TimeMajor())


def test_mot_layout_is_a_recipe_option_saved_and_restored(tmp_path) -> None:
    mot = {"strategy": "mot", "num_experts": 4, "group_size": 2, "init": "random"}
    model = mc.convert(time_major(), **mot, layout="seq_first").eval()
    assert {b.layout for b in mc.sparse_blocks(model).values()} == {"seq_first"}
    mc.save(model, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "mixcompile.json").read_text())["recipes"][0]
    assert recipe["layout"] == "seq_first"
    loaded = mc.load(tmp_path / "m", base=time_major()).eval()
    assert {b.layout for b in mc.sparse_blocks(loaded).values()} == {"seq_first"}
    x = torch.randn(5, 4, 16)  # [T, B, d]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        # the layout is what makes them equal: the same blocks read batch-first mix along time instead
        for block in mc.sparse_blocks(loaded).values():
            block.layout = "batch_first"
        assert not torch.allclose(loaded(x), model(x))
    with pytest.raises(mc.ConfigError, match="layout='seq_first' is a MoT option"):
        mc.convert(time_major(), strategy="moe", layout="seq_first")


def test_a_cli_layout_the_model_contradicts_is_refused_naming_the_site(tmp_path, capsys) -> None:
    torch.save(mc.build_tiny_gpt(**TINY), tmp_path / "dense.pt")
    args = ["convert", str(tmp_path / "dense.pt"), "--trust-pickle", "-o", str(tmp_path / "out")]
    assert main([*args, "--strategy", "mot", "--layout", "seq_first"]) == 2  # usage: the flag is wrong
    err = capsys.readouterr().err
    assert "FFN site 0" in err and "layout='seq_first'" in err and "'batch_first'" in err, err
    assert not (tmp_path / "out").exists()


# ---- conversion cost, structure only, untraceable inputs ---------------------------------------------------


def test_a_model_on_the_meta_device_converts_to_the_same_structure() -> None:
    with torch.device("meta"):
        skeleton = mc.build_tiny_gpt(**TINY)
    meta = mc.convert(skeleton, strategy="moe", num_experts=4, top_k=2)
    real = mc.convert(mc.build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2)
    assert all(p.is_meta for p in meta.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }


def test_saving_a_model_still_on_the_meta_device_is_refused_in_words(tmp_path) -> None:
    with torch.device("meta"):
        skeleton = llama()
    meta = mc.convert(skeleton, strategy="moe", num_experts=4, top_k=2)
    for save in (lambda: mc.save(meta, tmp_path / "a"), lambda: meta.save_pretrained(tmp_path / "b")):
        with pytest.raises(
            mc.ConfigError, match=r"LlamaForCausalLM has \d+ tensors on the meta device.*assign=True"
        ):
            save()
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_the_conversion_cost_benchmark_runs() -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_convert.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "time ratio" in done.stdout and "memory ratio" in done.stdout


def test_untraceable_inputs_say_what_to_pass_instead(tmp_path, capsys) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    cases = [
        (torch.jit.script(module), "TorchScript module"),
        (torch.compile(module), r"model\._orig_mod"),
        (torch.export.export(module, (torch.randn(2, 4),)), "torch.export program"),
    ]
    for model, hint in cases:
        for function in (mc.inspect, mc.convert):
            with pytest.raises(TypeError, match=hint):
                function(model)
    torch.jit.save(torch.jit.script(module), tmp_path / "scripted.pt")
    assert main(["inspect", str(tmp_path / "scripted.pt"), "--trust-pickle"]) == 1
    assert "TorchScript archive" in capsys.readouterr().err


class _TableRouter(mc.LearnedRouter):
    """A router holding a table it computes when built (a non-persistent buffer, like rotary frequencies)."""

    def __init__(self, d_model, num_experts, top_k, **options):
        super().__init__(d_model, num_experts, top_k, **options)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, num_experts), persistent=False)

    def forward(self, x, kernel):
        logits = self.logits(x) * self.scale
        probs, experts, weights = kernel.topk_routing(logits, self.top_k)
        return self.token_choice_plan(logits, experts, weights, probs)


class _TablePlugin:
    @mc.hookimpl
    def register_routers(self, register):
        register("table", _TableRouter)


def test_a_router_with_a_computed_buffer_loads(tmp_path) -> None:
    """No file holds a non-persistent buffer: the loading skeleton keeps it as the router computed it."""
    mc.register_plugin(_TablePlugin(), name="table_plugin")
    try:
        torch.manual_seed(0)
        model = mc.convert(mc.build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2, router="table")
        mc.save(model, tmp_path / "m")
        loaded = mc.load(tmp_path / "m")
    finally:
        mc.unregister_plugin("table_plugin")
    tokens = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(loaded.eval()(tokens), model.eval()(tokens), rtol=0, atol=0)
