"""``mixcompile convert`` of a Hugging Face directory writes a drop-in replacement (its generation config
and tokenizer files too, read as transformers reads them but never waited on); ``bench`` times both models in
the checkpoint's dtype."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import mixcompile as mc
from mixcompile.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A dense checkpoint with a generation config and a fast tokenizer, as the Hub ships them."""
    path = tmp_path_factory.mktemp("hf") / "llama"
    model = llama()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, max_new_tokens=3
    )
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(1, 128)} | {"<unk>": 0}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def test_convert_carries_the_generation_config_and_the_tokenizer_over(source, tmp_path, capsys) -> None:
    out = tmp_path / "moe"
    assert main(["convert", str(source), "-o", str(out), "--strategy", "moe", "--experts", "4"]) == 0
    printed = capsys.readouterr().out
    assert "copied tokenizer files: chat_template.jinja, tokenizer.json, tokenizer_config.json" in printed
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert mc.load(out).generation_config.eos_token_id == [2, 7]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w5 w9")["input_ids"] == [5, 9]


def test_tokenizer_files_are_read_as_transformers_reads_them_and_never_waited_on(
    source, tmp_path, capsys, monkeypatch
) -> None:
    """Symlinks are followed, as transformers follows them (the Hub cache is made of them); a FIFO, a file
    over the size limit and a tokenizer class transformers cannot import are skipped, with the reason."""
    copy = tmp_path / "in"
    copy.mkdir()
    for entry in source.iterdir():
        (copy / entry.name).write_bytes(entry.read_bytes())
    (tmp_path / "blob").write_text("a vocabulary")
    (copy / "vocab.txt").symlink_to(tmp_path / "blob")
    os.mkfifo(copy / "merges.txt")  # copying it would hang
    (copy / "spiece.model").write_bytes(b"x" * 64)
    monkeypatch.setattr("mixcompile.io.tokenizer_files.MAX_TOKENIZER_BYTES", 32)  # tokenizer.json too

    class Placeholder:  # what transformers gives for a class whose backend is not installed
        @property
        def vocab_files_names(self):
            raise ImportError("Placeholder requires the SentencePiece library")

    monkeypatch.setattr(transformers, "PlaceholderTokenizer", Placeholder(), raising=False)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PlaceholderTokenizer"})
    )
    out = tmp_path / "moe"
    assert main(["convert", str(copy), "-o", str(out), "--strategy", "moe", "--experts", "4"]) == 0
    captured = capsys.readouterr()
    assert "tokenizer file not copied: merges.txt" in captured.err
    assert "tokenizer file not copied: spiece.model" in captured.err and "over 32" in captured.err
    assert (out / "vocab.txt").read_text() == "a vocabulary" and not (out / "vocab.txt").is_symlink()
    assert not (out / "merges.txt").exists() and not (out / "spiece.model").exists()


def test_a_generation_config_key_hiding_a_method_is_refused_by_name(source, tmp_path, capsys) -> None:
    copy = tmp_path / "in"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((source / name).read_bytes())
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "save_pretrained": 1}))
    assert main(["convert", str(copy), "-o", str(tmp_path / "out"), "--strategy", "moe"]) == 2
    assert "sets 'save_pretrained', the name of a GenerationConfig method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_generation_config_that_is_a_fifo_is_refused_at_once(source, tmp_path, capsys) -> None:
    copy = tmp_path / "in"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((source / name).read_bytes())
    os.mkfifo(copy / "generation_config.json")
    assert main(["convert", str(copy), "-o", str(tmp_path / "out"), "--strategy", "moe"]) == 1
    assert "FIFO" in capsys.readouterr().err


def test_bench_times_the_base_in_the_dtype_of_the_converted_checkpoint(tmp_path, capsys) -> None:
    dense, out = tmp_path / "bf16", tmp_path / "moe"
    llama(torch.bfloat16).save_pretrained(dense)
    assert main(["convert", str(dense), "-o", str(out), "--strategy", "moe", "--experts", "4"]) == 0
    saved = json.loads((out / "config.json").read_text())["mixcompile"]["base"]["config"]
    assert saved["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["bench", str(out), "--batch", "1", "--seq", "8", "--steps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[1][:2] == ["model", "dtype"]
    assert [row[:2] for row in rows[2:]] == [["base", "bfloat16"], ["converted", "bfloat16"]]


def test_bench_casts_a_base_that_records_no_dtype_to_the_converted_models(tmp_path, capsys) -> None:
    """A builder's base (the tiny GPT) is built in float32; the saved model is bfloat16."""
    tiny = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "max_seq": 16}
    model = mc.convert(mc.build_tiny_gpt(**tiny), strategy="moe", num_experts=2, top_k=1)
    mc.save(model.to(torch.bfloat16), tmp_path / "saved")
    assert main(["bench", str(tmp_path / "saved"), "--batch", "1", "--seq", "8", "--steps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:2] for row in rows[2:]] == [["base", "bfloat16"], ["converted", "bfloat16"]]
