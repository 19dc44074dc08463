"""Saved directories are untrusted input: a tampered ``mixcompile.json`` gives a clear ``LoadError`` and runs
nothing, through ``mixcompile.load`` and through every CLI command that reads a directory.

Each payload would create a sentinel file if it ran; the last tests show that the same payloads do run
when the user passes the trust flag, so a sentinel that stays absent proves something.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mixcompile as mc
from mixcompile import build_tiny_gpt
from mixcompile.cli import main

TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "max_seq": 16}


class Payload:
    """Unpickling this creates the sentinel file (``open(path, "w")``)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trust") / "model"
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1), path)
    return path


@pytest.fixture
def world(tmp_path, saved, monkeypatch):
    """A fresh copy of the saved directory, an importable payload module and a pickle payload."""
    sentinel = tmp_path / "SENTINEL"
    code = tmp_path / "code"
    code.mkdir()
    (code / "evil_payload.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n\ndef build(**kwargs):\n    open({str(sentinel)!r}, 'w')\n"
    )
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("evil_payload", None)
    torch.save(Payload(sentinel), tmp_path / "evil.pt")
    directory = tmp_path / "model"
    shutil.copytree(saved, directory)
    manifest = json.loads((directory / "mixcompile.json").read_text())
    return {"dir": directory, "sentinel": sentinel, "evil": tmp_path / "evil.pt", "manifest": manifest}


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _base(spec: dict) -> Callable[[dict, dict], None]:
    def tamper(manifest: dict, world: dict) -> None:
        manifest["base"] = spec

    return tamper


def _recipe(**fields) -> Callable[[dict, dict], None]:
    def tamper(manifest: dict, world: dict) -> None:
        manifest["recipes"][0].update(fields)

    return tamper


def _field(name: str, value) -> Callable[[dict, dict], None]:
    def tamper(manifest: dict, world: dict) -> None:
        manifest[name] = value

    return tamper


def _pickle_base(file: str, *, copy_in: str | None = None, link_to_evil: bool = False):
    def tamper(manifest: dict, world: dict) -> None:
        if copy_in:
            shutil.copyfile(world["evil"], world["dir"] / copy_in)
        if link_to_evil:
            (world["dir"] / file).symlink_to(world["evil"])
        manifest["base"] = {"kind": "pickle", "file": file, "sha256": _digest(world["evil"])}

    return tamper


def _weights_special(kind: str):
    def tamper(manifest: dict, world: dict) -> None:
        target = world["dir"] / "w.safetensors"
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "dir":
            target.mkdir()
        else:
            target.symlink_to(world["dir"].parent / "outside.safetensors")
            shutil.copyfile(world["dir"] / "model.safetensors", world["dir"].parent / "outside.safetensors")
        manifest["weights"] = "w.safetensors"

    return tamper


def _hf(**config) -> Callable[[dict, dict], None]:
    base = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    base.update({"num_attention_heads": 4, "model_type": "llama"})
    return _base({"kind": "transformers", "class": "LlamaForCausalLM", "config": {**base, **config}})


TAMPERED = {
    # base builders and code
    "import-arbitrary-function": (
        _base({"kind": "import", "target": "evil_payload:build"}),
        "trust_code=True",
    ),
    "import-os-system": (
        _base({"kind": "import", "target": "os:system", "kwargs": {"command": "true"}}),
        "trust_code=True",
    ),
    "chained-mixcompile-helper": (
        lambda m, w: m.update(
            base={
                "kind": "import",
                "target": "mixcompile.io.bases:read_pickle",
                "kwargs": {"file": str(w["evil"]), "trust_pickle": True},
            }
        ),
        "trust_code=True",
    ),
    "builder-named-by-path": (
        _base({"kind": "builder", "name": "mixcompile.io.bases:read_pickle", "kwargs": {}}),
        "is not registered",
    ),
    "legacy-target-extra-kwargs": (
        _base(
            {"kind": "import", "target": "mixcompile.toy:build_tiny_gpt", "kwargs": {"trust_pickle": True}}
        ),
        "no option 'trust_pickle'",
    ),
    "builder-nested-kwargs": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": {"d_model": {"__class__": "os.system"}}}),
        "must be a number, string, boolean or null",
    ),
    "builder-kwargs-not-object": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": [1]}),
        "must be an object",
    ),
    "builder-huge-size": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": {**TINY, "d_model": 10**12}}),
        "larger than a TinyGPT allows",
    ),
    "builder-string-size": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": {**TINY, "d_model": "32"}}),
        "must be an integer",
    ),
    "builder-bool-size": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": {**TINY, "n_layer": True}}),
        "must be an integer",
    ),
    "builder-other-structure": (
        _base({"kind": "builder", "name": "tiny_gpt", "kwargs": {**TINY, "n_layer": 3}}),
        "missing",
    ),
    "base-unknown-kind": (_base({"kind": "eval", "source": "1"}), "unknown kind 'eval'"),
    "base-not-object": (_field("base", "tiny_gpt"), "no 'base' section"),
    "import-target-malformed": (_base({"kind": "import", "target": "os.system"}), "must look like"),
    # pickled bases
    "pickle-absolute-path": (
        lambda m, w: m.update(base={"kind": "pickle", "path": str(w["evil"]), "sha256": _digest(w["evil"])}),
        "never named by path",
    ),
    "pickle-parent-path": (_pickle_base("../evil.pt"), "not a plain file name"),
    "pickle-symlink-out": (_pickle_base("base.pt", link_to_evil=True), "symlink leading outside"),
    "pickle-inside-untrusted": (_pickle_base("base.pt", copy_in="base.pt"), "--trust-pickle"),
    "pickle-bad-digest": (
        lambda m, w: m.update(base={"kind": "pickle", "file": "base.pt", "sha256": "x" * 64}),
        "64 hex digits",
    ),
    # Hugging Face bases
    "hf-not-a-model-class": (
        _base({"kind": "transformers", "class": "pipeline", "config": {}}),
        "no model class",
    ),
    "hf-dotted-class": (
        _base({"kind": "transformers", "class": "os.system", "config": {}}),
        "model class name",
    ),
    "hf-auto-map": (_hf(auto_map={"AutoModel": "evil_payload.Model"}), "load code"),
    "hf-hub-attention": (_hf(attn_implementation="kernels-community/flash-attn"), "from the Hub"),
    "hf-absurd-layers": (_hf(num_hidden_layers=10**9), "sane layer count"),
    "hf-other-structure": (_hf(), "could not be applied to its base model"),
    # weights
    "weights-parent": (_field("weights", "../../etc/passwd"), "not a plain file name"),
    "weights-absolute": (_field("weights", "/etc/passwd"), "not a plain file name"),
    "weights-number": (_field("weights", 5), "must be a file name"),
    "weights-empty": (_field("weights", ""), "must be a file name"),
    "weights-symlink-out": (_weights_special("symlink"), "symlink leading outside"),
    "weights-fifo": (_weights_special("fifo"), "FIFO"),
    "weights-directory": (_weights_special("dir"), "is a directory"),
    # recipes
    "recipes-string": (_field("recipes", "moe"), "no 'recipes' section"),
    "recipes-of-numbers": (_field("recipes", [5]), "no 'recipes' section"),
    "recipe-filter-fn": (_recipe(filter_fn="os.system"), "filter_fn"),
    "recipe-router-path": (_recipe(router="os.system"), "unknown router"),
    "recipe-huge-experts": (_recipe(num_experts=10**9), "num_experts must be <= 65536"),
    "recipe-string-experts": (_recipe(num_experts="2"), "num_experts must be an integer"),
    "recipe-negative-seed": (_recipe(seed=-1), "seed must be >= 0"),
    "recipe-unknown-option": (_recipe(exec="print(1)"), "unknown option 'exec'"),
    "recipe-unknown-layout": (_recipe(layout="sideways"), "unknown layout 'sideways'"),
    "recipe-moe-with-a-layout": (_recipe(layout="flat"), "layout='flat' is a MoT option"),
    "recipe-options-not-object": (_recipe(router_options="evil"), "router_options must be a dict"),
    "recipe-bad-router-option": (_recipe(router_options={"capacity_factor": -1}), "capacity_factor"),
    "recipe-sites-out-of-range": (_recipe(sites=[99]), "out of range"),
    "recipe-other-experts": (_recipe(num_experts=3), "another shape"),
    "recipe-router-list": (_recipe(router=["topk"]), "router must be a name"),
    "recipe-kernel-list": (_recipe(kernel=["auto"]), "kernel must be a name"),
    "recipe-init-object": (_recipe(init={"a": 1}), "init must be a name"),
    # the manifest itself
    "format": (_field("format", "pickle"), "not a mixcompile manifest"),
    "format-version": (_field("format_version", 2), "format_version 2"),
    "format-version-bool": (_field("format_version", True), "format_version True"),
    "unknown-field": (_field("exec", "import os"), "unknown fields ['exec']"),
    "version-not-string": (_field("mixcompile_version", 1), "must be a string"),
    # plugin providers: printed in errors, so plain names only
    "plugins-not-object": (_field("plugins", ["revplug"]), "'plugins' must be an object"),
    "plugins-escape-in-version": (
        _field("plugins", {"router:topk": {"package": "p", "version": "1\x1b[2J"}}),
        "a distribution's name and version",
    ),
    "plugins-extra-field": (
        _field("plugins", {"router:topk": {"package": "p", "url": "http://x"}}),
        "must be an object with a 'package' name",
    ),
}


def _write(world: dict, tamper) -> None:
    manifest = copy.deepcopy(world["manifest"])
    tamper(manifest, world)
    (world["dir"] / "mixcompile.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_manifest_is_refused_by_load_and_runs_nothing(case: str, world: dict) -> None:
    tamper, fragment = TAMPERED[case]
    _write(world, tamper)
    with pytest.raises(mc.LoadError, match=re.escape(fragment)):
        mc.load(world["dir"])
    assert not world["sentinel"].exists()
    assert "evil_payload" not in sys.modules


COMMANDS = {
    "inspect": lambda d, out: ["inspect", str(d)],
    "convert": lambda d, out: ["convert", str(d), "-o", str(out), "--strategy", "moe", "--experts", "2"],
    "bench": lambda d, out: [
        "bench",
        str(d),
        "--batch",
        "1",
        "--seq",
        "4",
        "--steps",
        "1",
        "--device",
        "cpu",
    ],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_manifest_is_refused_by_every_cli_command(case, command, world, tmp_path, capsys) -> None:
    tamper, fragment = TAMPERED[case]
    _write(world, tamper)
    out = tmp_path / "out"
    code = main(COMMANDS[command](world["dir"], out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("mixcompile: error:"), err
    assert fragment in err[0]
    assert not world["sentinel"].exists()
    assert "evil_payload" not in sys.modules
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_oversized_and_unreadable_manifests_fail_at_once(world) -> None:
    manifest = world["dir"] / "mixcompile.json"
    manifest.write_bytes(b" " * (17 << 20))
    with pytest.raises(mc.LoadError, match="too large for a mixcompile manifest"):
        mc.load(world["dir"])
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(mc.LoadError, match="not valid JSON"):
        mc.load(world["dir"])
    manifest.write_text("{not json")
    with pytest.raises(mc.LoadError, match="not valid JSON"):
        mc.load(world["dir"])
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with pytest.raises(mc.LoadError, match="symlink leading outside"):
        mc.load(world["dir"])


def test_the_payloads_are_live_when_trusted(world) -> None:
    """The refusals above are what stops these payloads: with the trust flag they do run."""
    _write(world, TAMPERED["import-arbitrary-function"][0])
    with pytest.raises(mc.LoadError):  # the payload returns no model, but it ran
        mc.load(world["dir"], trust_code=True)
    assert world["sentinel"].exists()
    world["sentinel"].unlink()
    _write(world, _pickle_base("base.pt", copy_in="base.pt"))
    with pytest.raises(mc.LoadError, match="not a full nn.Module"):
        mc.load(world["dir"], trust_pickle=True)
    assert world["sentinel"].exists()


def test_a_subprocess_inspect_runs_no_payload_without_trust_code(world) -> None:
    _write(world, TAMPERED["import-arbitrary-function"][0])
    env = {**os.environ, "PYTHONPATH": str(world["sentinel"].parent / "code")}
    for extra, code in (([], 1), (["--trust-code"], 1)):
        result = subprocess.run(
            [sys.executable, "-m", "mixcompile", "inspect", str(world["dir"]), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == code, result.stderr
        assert world["sentinel"].exists() == bool(extra), result.stderr


def test_registered_builders_are_listed_as_plugins(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {"kind": "builder", "name": "tiny_gpt", "plugin": "mixcompile_plugins.builders"}.items() <= next(
        e for e in entries if e["kind"] == "builder"
    ).items()


def test_directories_written_before_builders_still_load(world) -> None:
    legacy = {"kind": "import", "target": "mixcompile.toy:build_tiny_gpt", "kwargs": TINY}
    _write(world, _base(legacy))
    loaded = mc.load(world["dir"])
    assert type(loaded).__name__ == "TinyGPT" and len(mc.sparse_blocks(loaded)) == 2


def test_a_hugging_face_directory_that_loads_code_needs_trust(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "evil_payload.Model"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    assert main(["inspect", str(tmp_path / "hf")]) == 1
    assert "auto_map makes transformers load code" in capsys.readouterr().err
    data.pop("auto_map")
    data["architectures"] = ["pipeline"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    assert main(["inspect", str(tmp_path / "hf")]) == 1
    assert "no model class 'pipeline'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty"),
        (b"\x00garbage", "not a PyTorch file"),
        (b"PK\x05\x06" + bytes(18), "not a PyTorch file"),  # an empty zip archive: no data.pkl
    ],
)
@pytest.mark.parametrize("trust", [[], ["--trust-pickle"]])
def test_a_pt_file_that_is_no_pickle_is_called_what_it_is(tmp_path, capsys, content, fragment, trust) -> None:
    """Not "a pickle: pass --trust-pickle", then "Ran out of input" once trusted: told without unpickling."""
    (tmp_path / "model.pt").write_bytes(content)
    assert main(["inspect", str(tmp_path / "model.pt"), *trust]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "--trust-pickle" not in err[0], err


@pytest.mark.parametrize("protocol", [1, 2])  # torch.load cannot read protocol 0 (its persistent ids)
def test_a_legacy_torch_save_is_a_pickle_needing_trust(tmp_path, capsys, protocol) -> None:
    """torch.save's format before torch 1.6, in any pickle protocol torch.load reads, is a pickle: refused
    without the trust flag, read with it (protocol 1 was called "not a PyTorch file")."""
    path = tmp_path / "legacy.pt"
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    torch.save(model, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert main(["inspect", str(path)]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(path), "--trust-pickle"]) == 0
