"""Hugging Face directories of converted models are drop-in replacements: every tensor (whatever the class
leaves out on save), the generation config, and ``from_pretrained`` keywords applied or refused by name."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo import hf_qwen2_moe

import mixcompile as mc

transformers = pytest.importorskip("transformers")


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, max_new_tokens=3
    )
    return model


def ids() -> torch.Tensor:
    return torch.tensor([[5, 6, 9, 11]])


# ---- every tensor is saved ------------------------------------------------------------------------------


def test_save_pretrained_of_a_converted_marian_writes_every_tensor_and_loads_back(tmp_path) -> None:
    """MarianMTModel lists its sinusoidal positions in _keys_to_ignore_on_save; the exact-coverage load
    check would refuse the directory without them."""
    config = transformers.MarianConfig(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128, max_position_embeddings=128,
        decoder_vocab_size=128, pad_token_id=127, decoder_start_token_id=127,
    )  # fmt: skip
    torch.manual_seed(0)
    model = mc.convert(transformers.MarianMTModel(config).eval(), strategy="moe", num_experts=4, top_k=2)
    ignored = set(model._keys_to_ignore_on_save)
    assert "model.encoder.embed_positions.weight" in ignored
    model.save_pretrained(tmp_path / "m")
    assert set(model._keys_to_ignore_on_save) == ignored  # restored after saving
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as weights:
        assert ignored <= set(weights.keys())
    inputs = {"input_ids": ids(), "decoder_input_ids": ids()}
    rebuilt = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    for loaded in (mc.load(tmp_path / "m"), rebuilt):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**inputs).logits, model(**inputs).logits)


# ---- the generation config ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted():
    dense = llama()
    return dense, mc.convert(llama(), strategy="moe", num_experts=4, top_k=2).eval()


@pytest.mark.parametrize("how", ["mc.save", "save_pretrained"])
def test_the_generation_config_is_saved_and_restored(converted, tmp_path, how) -> None:
    dense, model = converted
    path = tmp_path / "m"
    mc.save(model, path) if how == "mc.save" else model.save_pretrained(path)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    auto = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        expected = dense.generate(ids())
        for loaded in (mc.load(path).eval(), auto.eval()):
            assert loaded.generation_config.eos_token_id == [2, 7]
            assert loaded.generation_config.max_new_tokens == 3
            assert torch.equal(loaded.generate(ids()), expected)


@pytest.mark.parametrize("case", ["symlink out", "fifo", "not json", "not an object", "hides a method"])
def test_a_hostile_generation_config_is_refused_by_name(converted, tmp_path, case) -> None:
    path = tmp_path / "m"
    mc.save(converted[1], path)
    file = path / "generation_config.json"
    file.unlink(missing_ok=True)
    if case == "symlink out":
        (tmp_path / "outside.json").write_text("{}")
        file.symlink_to(tmp_path / "outside.json")
    elif case == "fifo":
        os.mkfifo(file)
    elif case == "not json":
        file.write_text("{")
    elif case == "hides a method":  # loaded, it would break every later save
        file.write_text(json.dumps({"eos_token_id": 2, "save_pretrained": 1}))
    else:
        file.write_text(json.dumps([1, 2]))
    with pytest.raises(mc.LoadError, match="generation_config.json"):
        mc.load(path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the opened file's path comes from /proc")
def test_what_is_read_is_checked_not_only_the_path_before(tmp_path) -> None:
    """The confinement holds for the file actually opened: a symlink leading out that appears after the
    path was checked (here: a read of a path nothing checked) is refused, not read."""
    from mixcompile.io.files import read_json_object

    (tmp_path / "outside.json").write_text('{"secret": 1}')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mixcompile.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(mc.LoadError, match="symlink leading outside"):
        read_json_object(tmp_path / "m" / "mixcompile.json", "manifest", within=tmp_path / "m")


def test_a_converted_model_loads_from_a_hub_cache_snapshot(converted, tmp_path) -> None:
    """The Hub cache keeps files in blobs/ and a snapshot of symlinks to them (what from_pretrained of a
    Hub id downloads): symlinks into that blobs folder are the directory's own files."""
    saved = tmp_path / "saved"
    mc.save(converted[1], saved)
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for index, entry in enumerate(sorted(saved.iterdir())):
        (repo / "blobs" / f"blob{index}").write_bytes(entry.read_bytes())
        (snapshot / entry.name).symlink_to(f"../../blobs/blob{index}")
    model = mc.load(snapshot).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, converted[1](ids()).logits, rtol=0, atol=0)
    (snapshot / "mixcompile.json").unlink()
    (snapshot / "mixcompile.json").symlink_to(tmp_path / "saved" / "mixcompile.json")  # not the cache's blobs
    with pytest.raises(mc.LoadError, match="symlink leading outside"):
        mc.load(snapshot)


def test_a_converted_model_pickles_and_its_copy_still_saves_pretrained(converted, tmp_path) -> None:
    """Its save_pretrained is set on the instance; a bound method there pickled as an attribute of that name,
    which the class lacks, so the model did not unpickle (torch.save of a whole model, multiprocessing)."""
    _, model = converted
    twin = pickle.loads(pickle.dumps(model))
    twin.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)


# ---- AutoModel.from_pretrained keywords -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(converted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kw") / "m"
    mc.save(converted[1], path)
    return path


def from_pretrained(path: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)


def test_from_pretrained_applies_the_keywords_it_can(saved) -> None:
    model = from_pretrained(saved, attn_implementation="eager", output_hidden_states=True, use_cache=False)
    assert model.config._attn_implementation == "eager"
    assert model.config.output_hidden_states is True and model.config.use_cache is False
    assert len(model(ids()).hidden_states) == 3
    model, info = from_pretrained(saved, device_map="cpu", dtype=torch.bfloat16, output_loading_info=True)
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert from_pretrained(saved).config._attn_implementation != "eager"


def test_from_pretrained_gives_eval_mode_as_transformers_does(converted, tmp_path) -> None:
    """A model saved in training mode came back training: dropout on, so two identical forwards and
    greedy generate() calls differed (transformers' own from_pretrained always returns eval mode)."""
    model = converted[1]
    model.train()
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        model.eval()
    loaded = from_pretrained(tmp_path / "m")
    assert not any(module.training for module in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_from_pretrained_applies_experts_implementation(tmp_path) -> None:
    mc.save(mc.convert(hf_qwen2_moe(), num_experts=4), tmp_path / "m")
    assert from_pretrained(tmp_path / "m", experts_implementation="eager").config._experts_implementation == (
        "eager"
    )


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"num_hidden_layers": 1}, "num_hidden_layers=1"),
        ({"not_a_keyword": 3}, "not_a_keyword=3"),
        ({"device_map": "auto"}, "device_map='auto'"),
        ({"device_map": {"model": "cpu", "lm_head": "meta"}}, "device_map="),
        ({"quantization_config": {"load_in_8bit": True}}, "quantization_config="),
        ({"use_safetensors": False}, "use_safetensors=False"),
        ({"dtype": "int8"}, "dtype=torch.int8"),
        ({"device_map": True}, "device_map=True"),
        ({"device_map": "meta"}, "device_map='meta'"),
        ({"dtype": torch.float16, "torch_dtype": torch.float32}, "dtype=torch.float16 with torch_dtype"),
    ],
)
def test_from_pretrained_refuses_every_other_keyword_by_name(saved, kwargs, named) -> None:
    with pytest.raises(mc.LoadError, match=named.replace("[", r"\[")) as info:
        from_pretrained(saved, **kwargs)
    assert "Load it without that keyword" in str(info.value)
