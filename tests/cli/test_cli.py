"""The real CLI, driven as a subprocess: round trips for each input format, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mixcompile as mc
from mixcompile import build_tiny_gpt

TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "max_seq": 16}
PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "third_party_plugin"


def run(*args, env=None, check_code=None):
    result = subprocess.run(
        [sys.executable, "-m", "mixcompile", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if check_code is not None:
        assert result.returncode == check_code, result.stdout + result.stderr
    return result


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixcompile: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tokens(vocab=256, seq=8):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path, model


def test_hugging_face_directory_round_trip(hf_llama, tmp_path):
    source, original = hf_llama
    out = tmp_path / "llama-moe"
    result = run(
        "convert", source, "-o", out, "--strategy", "moe", "--experts", "4", "--top-k", "2", check_code=0
    )
    assert "converted" in result.stdout
    assert (out / "config.json").is_file() and (out / "mixcompile.json").is_file()
    loaded = mc.load(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert len(mc.sparse_blocks(loaded)) == 2
    ids = tokens(100)
    with torch.no_grad():
        expected, got = original(ids).logits, loaded(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5  # upcycled: still the dense function
    report = json.loads(run("inspect", out, "--json", check_code=0).stdout)
    assert report["sites"] == []  # nothing dense is left
    assert [(b["path"], b["kind"], b["num_experts"]) for b in report["sparse_blocks"]] == [
        ("model.layers.0.mlp", "moe", 4),
        ("model.layers.1.mlp", "moe", 4),
    ]
    assert not any(path.startswith("model.layers.0.mlp") for path in report["untraced"])
    assert loaded.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, 10)


def test_mixcompile_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    base = build_tiny_gpt(**TINY)
    model = mc.convert(base, strategy="mot", num_experts=4, group_size=2, init="random")
    mc.save(model, tmp_path / "saved")  # build_tiny_gpt records its registered builder
    loaded = mc.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens()), model.eval()(tokens()))
    inspected = run("inspect", tmp_path / "saved", check_code=0).stdout
    assert inspected.startswith("mixcompile report for TinyGPT: no dense FFN sites; already sparse: 2 blocks")


def test_pickled_module_round_trip(tmp_path):
    torch.manual_seed(0)
    original = build_tiny_gpt(**TINY).eval()
    torch.save(original, tmp_path / "model.pt")
    refused = run("convert", tmp_path / "model.pt", "-o", tmp_path / "out", "--strategy", "moe")
    assert_one_line_error(refused, 1, "pickle", "--trust-pickle")
    assert not (tmp_path / "out").exists()
    run(
        "convert",
        tmp_path / "model.pt",
        "-o",
        tmp_path / "out",
        "--strategy",
        "moe",
        "--experts",
        "4",
        "--trust-pickle",
        check_code=0,
    )
    base = json.loads((tmp_path / "out" / "mixcompile.json").read_text())["base"]
    assert base["kind"] == "pickle" and base["file"] == "base.pt"  # stored inside, never named by path
    (tmp_path / "model.pt").unlink()
    loaded = mc.load(tmp_path / "out", trust_pickle=True).eval()
    with torch.no_grad():
        expected = original(tokens())
        assert ((loaded(tokens()) - expected).norm() / expected.norm()).item() < 1e-5


def test_torch_export_program_is_refused_with_a_reason(tmp_path):
    program = torch.export.export(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.randn(2, 4),)
    )
    torch.export.save(program, tmp_path / "model.pt2")
    result = run("convert", tmp_path / "model.pt2", "-o", tmp_path / "out", "--strategy", "moe")
    assert_one_line_error(result, 1, "torch.export", "not supported")


def test_plugins_lists_builtins_and_an_installed_third_party_plugin(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(PLUGIN, source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(tmp_path / "site"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = run("plugins", env={"PYTHONPATH": str(tmp_path / "site")}, check_code=0)
    assert (
        "cosine" in result.stdout
        and "topk" in result.stdout
        and "mixcompile_plugins.routers" in result.stdout
    )
    listed = json.loads(run("plugins", "--json", env={"PYTHONPATH": str(tmp_path / "site")}).stdout)
    assert {"kind": "router", "name": "cosine", "plugin": "cosine"}.items() <= next(
        e for e in listed if e["name"] == "cosine"
    ).items()


@pytest.fixture
def saved_dir(tmp_path):
    base = build_tiny_gpt(**TINY)
    model = mc.convert(base, strategy="moe", num_experts=2, top_k=1)
    path = tmp_path / "saved"
    mc.save(model, path)
    return path


def test_bad_inputs_get_one_line_and_a_nonzero_code(tmp_path, saved_dir, hf_llama):
    source, _ = hf_llama
    assert_one_line_error(run("inspect", tmp_path / "missing"), 1, "does not exist")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run("inspect", tmp_path / "notes.txt"), 1, "is not a model")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("inspect", tmp_path / "empty"), 1, "not a model directory")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(saved_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(run("inspect", corrupt), 1, "model.safetensors", "corrupt or truncated")
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("inspect", truncated), 1, "corrupt or truncated")

    out = tmp_path / "out"
    assert_one_line_error(
        run("convert", source, "-o", out, "--strategy", "mox"), 2, "strategy", "Did you mean 'mot'"
    )
    assert_one_line_error(
        run("convert", source, "-o", out, "--strategy", "moe", "--router", "topp"),
        2,
        "unknown router 'topp'",
        "Did you mean 'topk'",
    )
    assert_one_line_error(run("convert", source, "-o", source, "--strategy", "moe"), 2, "overwrite")
    out.mkdir()
    assert_one_line_error(run("convert", source, "-o", out, "--strategy", "moe"), 2, "exists", "--force")
    run("convert", source, "-o", out, "--strategy", "moe", "--experts", "2", "--force", check_code=0)
    assert (out / "mixcompile.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no temporary leftovers
    assert_one_line_error(
        run("convert", source, "-o", tmp_path / "o2", "--strategy", "moe", "--experts", "2", "--top-k", "3"),
        2,
        "top_k",
    )


def test_inspect_describes_moe_unless_told_and_a_manifest_is_not_a_recipe(saved_dir, hf_llama):
    source, _ = hf_llama
    report = run("inspect", source, "--experts", "4", check_code=0).stdout
    assert "would convert 2 (moe, 4 experts)" in report  # as with no flags at all: moe
    assert_one_line_error(run("convert", source, "-o", saved_dir / "x", "--experts", "4"), 2, "--strategy")
    assert_one_line_error(
        run("inspect", source, "--recipe", saved_dir / "mixcompile.json"), 2, "is a saved model's manifest"
    )


def test_output_paths_that_cannot_be_written_are_named(tmp_path, hf_llama):
    source, _ = hf_llama
    assert_one_line_error(run("convert", source, "-o", "", "--strategy", "moe"), 2, "an empty path")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = run("convert", source, "-o", blocked / "out", "--strategy", "moe")
    assert_one_line_error(result, 1, f"cannot write {blocked / 'out'}")
    assert "staging" not in result.stderr
    assert blocked.read_text() == "not a directory"


def test_a_reader_that_stops_early_gets_no_error(hf_llama):
    """`mixcompile inspect ... | head`: a closed pipe ends the command quietly, as SIGPIPE ends Unix tools."""
    source, _ = hf_llama
    script = "import sys, time; time.sleep(1); from mixcompile.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "inspect", str(source), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the command writes anything
    _, err = process.communicate(timeout=300)
    assert process.returncode == 141 and err.decode() == ""


def test_model_without_ffn_converts_nothing(tmp_path):
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), tmp_path / "no_ffn.pt")
    result = run(
        "convert",
        tmp_path / "no_ffn.pt",
        "-o",
        tmp_path / "out",
        "--strategy",
        "moe",
        "--trust-pickle",
        check_code=0,
    )
    assert "nothing to convert" in result.stdout
    assert not (tmp_path / "out").exists()


def test_bench_times_a_saved_model_against_its_base(saved_dir):
    result = run("bench", saved_dir, "--batch", "2", "--seq", "8", "--steps", "1", check_code=0)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"base", "converted"}
    assert float(rows["base"][-1]) == 1.0 and float(rows["converted"][-1]) > 0
    assert rows["base"][1] == rows["converted"][1] == "float32"  # the dtype both are timed in
    assert int(rows["converted"][2].replace(",", "")) > int(rows["base"][2].replace(",", ""))


def test_bench_defaults_to_a_sequence_the_model_allows(saved_dir):
    """TinyGPT here takes 16 positions: the default (128) shrinks to that; an explicit --seq does not."""
    result = run("bench", saved_dir, "--batch", "2", "--steps", "1", check_code=0)
    assert "sequence 16," in result.stdout
    assert_one_line_error(
        run("bench", saved_dir, "--seq", "17"), 2, "--seq 17 is longer than TinyGPT allows (16)"
    )


def test_bench_of_an_unconverted_model_needs_a_strategy(hf_llama):
    assert_one_line_error(run("bench", hf_llama[0]), 2, "--strategy")


def test_help_and_usage():
    assert "examples:" in run("--help", check_code=0).stdout
    assert "--strategy" in run("convert", "--help", check_code=0).stdout
    assert run("convert").returncode == 2  # argparse: missing arguments


def test_demo_runs():
    result = run("demo", check_code=0)
    assert "MoE" in result.stdout and "max |MoE - dense|" in result.stdout
