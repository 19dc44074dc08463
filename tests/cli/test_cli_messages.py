"""What the command says: the real refusal first, what the user typed (not a rewrite of it), defaults
called defaults, each warning once, and exit 1 for a model problem, 2 only for a wrong command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mixcompile as mc
from mixcompile import build_tiny_gpt
from mixcompile.cli import main

TINY = {"d_model": 16, "n_layer": 2, "n_head": 2, "d_ff": 32, "max_seq": 8}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A saved model with no dense FFN left."""
    path = tmp_path_factory.mktemp("messages") / "moe"
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1), path)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A torch.save'd module the CLI knows no inputs for."""
    path = tmp_path_factory.mktemp("messages") / "seq.pt"
    torch.save(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)), path)
    return path


def command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The exit code, standard output and standard error of one command (argparse's errors exit)."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit:
        code = int(exit.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, expected: int, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == expected and len(lines) == 1 and lines[0].startswith("mixcompile: error:"), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bench_of_a_converted_model_with_recipe_flags_gives_that_refusal_first(converted, capsys) -> None:
    code, _, err = command(["bench", converted, "--experts", "8"], capsys)
    one_error(code, err, 2, "converted already", "without recipe options")
    assert "--strategy" not in err


def test_bench_of_a_model_it_cannot_make_inputs_for_exits_1(dense, capsys) -> None:
    argv = ["bench", dense, "--trust-pickle", "--strategy", "moe", "--experts", "2", "--steps", "1"]
    code, _, err = command(argv, capsys)
    one_error(code, err, 1, "cannot make an example input for Sequential")


def test_a_default_top_k_is_called_the_default(converted, tmp_path, capsys) -> None:
    code, _, err = command(
        ["convert", converted, "-o", tmp_path / "out", "--strategy", "moe", "--experts", "1"], capsys
    )
    # the router's wording (mixcompile.convert's), with the flags named
    one_error(code, err, 2, "--top-k (default 2) is more than --experts 1: top_k must be <= num_experts (a")


def test_a_recipe_file_value_is_named_with_its_file(converted, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"strategy": "moe", "num_experts": "8"}))
    code, _, err = command(["convert", converted, "-o", tmp_path / "out", "--recipe", recipe], capsys)
    one_error(code, err, 2, f"--recipe {recipe}", "num_experts must be an integer")
    recipe.write_text(json.dumps({"strategy": "moe", "num_experts": 2, "top_k": 3}))
    code, _, err = command(["convert", converted, "-o", tmp_path / "out", "--recipe", recipe], capsys)
    one_error(code, err, 2, f"top_k 3 (from {recipe}) is more than num_experts 2 (from {recipe})")


def test_a_flag_error_over_a_recipe_file_is_not_blamed_on_the_file(converted, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"num_experts": 2}))
    argv = ["convert", converted, "-o", tmp_path / "out", "--recipe", recipe, "--strategy", "moe"]
    code, _, err = command([*argv, "--group-size", "2"], capsys)
    one_error(code, err, 2, "--group-size applies to --strategy mot only")
    assert str(recipe) not in err
    # a value of the file's that a flag overrides is not the error: the flag's own mistake is
    recipe.write_text(json.dumps({"strategy": "moe", "num_experts": 0}))
    code, _, err = command([*argv, "--experts", "4", "--mode", "sparse"], capsys)
    one_error(code, err, 2, "--mode applies to --strategy mot only")
    assert str(recipe) not in err


def test_layers_are_echoed_as_typed(converted, tmp_path, capsys) -> None:
    argv = ["convert", converted, "-o", tmp_path / "out", "--strategy", "moe"]
    one_error(*command([*argv, "--layers=every:-1"], capsys)[::2], 2, "'every:-1'")
    one_error(*command([*argv, "--layers=0,one_two"], capsys)[::2], 2, "--layers '0,one_two'")


def test_layers_errors_name_the_flag(tmp_path, capsys) -> None:
    """They named the recipe option the flag sets: "N in sites='every:N' must be >= 1", "sites [9] ..."."""
    partly = tmp_path / "partly"  # dense FFNs left to pick among
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1, sites=[0]), partly)
    argv = ["convert", partly, "-o", tmp_path / "out", "--strategy", "moe"]
    code, _, err = command([*argv, "--layers=every:0"], capsys)
    one_error(code, err, 2, "--layers 'every:0': every:N takes a whole N >= 1")
    code, _, err = command([*argv, "--layers=every:\u00b2"], capsys)  # a digit to isdigit, not to int
    one_error(code, err, 2, "every:N takes a whole N >= 1")
    code, _, err = command([*argv, "--layers=0,9"], capsys)
    one_error(code, err, 2, "--layers 0,9: [9] out of range: the model has")
    code, _, err = command(["inspect", partly, "--layers=9"], capsys)
    one_error(code, err, 2, "--layers 9: [9] out of range")
    assert not (tmp_path / "out").exists()


def test_negative_layers_without_an_equals_sign_are_told_how_to_write_them(converted, capsys) -> None:
    code, _, err = command(["inspect", converted, "--layers", "-2,-1"], capsys)
    one_error(code, err, 2, "--layers=-2,-1")


def test_layers_on_a_model_with_no_dense_ffn_left_is_nothing_to_convert(converted, tmp_path, capsys) -> None:
    argv = ["convert", converted, "-o", tmp_path / "out", "--strategy", "moe", "--layers=0"]
    code, out, err = command(argv, capsys)
    assert code == 0 and "nothing to convert" in out and err == "", err
    assert not (tmp_path / "out").exists()
    code, out, err = command(["inspect", converted, "--layers=0"], capsys)
    assert code == 0 and "no dense FFN sites" in out, err


def test_a_strategy_in_capitals_gets_the_name_suggested(converted, tmp_path, capsys) -> None:
    code, _, err = command(["convert", converted, "-o", tmp_path / "out", "--strategy", "MoE"], capsys)
    one_error(code, err, 2, "unknown strategy 'MoE'", "Did you mean 'moe'?")


def test_a_layout_warning_is_printed_once_per_convert(dense, tmp_path, capsys) -> None:
    argv = ["convert", dense, "--trust-pickle", "-o", tmp_path / "out", "--strategy", "mot"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = command([*argv, "--experts", "2", "--group-size", "2"], capsys)
    assert code == 0, err
    assert err.count("mixcompile: warning:") == 1 and "batch-first" in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--strategy", "mot", "--top-k", "2"],
            "--top-k applies to --strategy moe only; drop it for --strategy mot",
        ),
        (["--strategy", "moe", "--group-size", "4", "--mixer", "softmax"], "--group-size, --mixer apply to"),
        (
            ["--strategy", "mot", "--router-option", "capacity_factor=1"],
            "--router-option applies to --strategy",
        ),
        (["--strategy", "moe", "--small-batch", "group"], "--small-batch applies to --strategy mot only"),
    ],
)
def test_a_flag_of_the_other_strategy_is_refused_even_at_its_default(
    converted, tmp_path, capsys, flags, message
):
    """`--strategy mot --top-k 2` converted without a word: the recipe refuses another strategy's options
    only away from their defaults, and cannot tell a default typed from one left alone."""
    code, _, err = command(["convert", converted, "-o", tmp_path / "out", *flags], capsys)
    one_error(code, err, 2, message)
    assert not (tmp_path / "out").exists()


def test_inspect_without_a_strategy_is_told_which_one_a_flag_needs(converted, tmp_path, capsys) -> None:
    code, _, err = command(["inspect", converted, "--group-size", "4"], capsys)
    one_error(code, err, 2, "--group-size applies to --strategy mot only; add --strategy mot")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"strategy": "mot"}))
    code, _, err = command(["inspect", converted, "--recipe", recipe, "--top-k", "2"], capsys)
    one_error(code, err, 2, "--top-k applies to --strategy moe only", f"for the strategy 'mot' of {recipe}")
