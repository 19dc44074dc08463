"""No input is ever lost, no output is ever half-written, nothing hangs, and every CLI argument is checked
before any work. Real subprocesses where the property is about processes (concurrency, signals)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixcompile as mc
from mixcompile import build_tiny_gpt
from mixcompile.cli import main
from mixcompile.io.files import STAGING_SUFFIX, check_not_overlapping, output_directory

TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "max_seq": 16}

# Runs the real CLI with the weights write slowed down (and announced), so another process can act mid-write.
SLOW_CLI = """
import sys, time, pathlib
import mixcompile.io.saving as save
marker, delay = pathlib.Path(sys.argv[1]), float(sys.argv[2])
original = save.save_model
def slow(*args, **kwargs):
    original(*args, **kwargs)
    marker.write_text("writing")
    time.sleep(delay)
save.save_model = slow
from mixcompile.cli import main
sys.exit(main(sys.argv[3:]))
"""


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its content hash: what "left intact" is checked against."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(STAGING_SUFFIX)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("safety") / "models" / "tiny"
    # One FFN left dense, so converting it again has work to do and writes an output.
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1, sites=[0]), path)
    return path


@pytest.fixture
def models(tmp_path, source) -> Path:
    """``models/tiny`` (a saved model) and ``models/notes/keep.txt`` (not a model) in a fresh folder."""
    root = tmp_path / "models"
    shutil.copytree(source, root / "tiny")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("mine")
    return root


def convert_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(src), "-o", str(out), "--strategy", "moe", "--experts", "2", *extra]


# ---- no input is ever lost ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, relation",
    [("tiny", "is the input"), ("tiny/sub", "is inside the input"), (".", "contains the input")],
)
def test_an_output_overlapping_the_input_is_refused_before_any_work(models, output, relation, capsys) -> None:
    before = tree(models)
    code = main(convert_args(models / "tiny", models / output, "--force"))
    err = capsys.readouterr().err
    assert code == 2 and relation in err and "overwrite" in err, err
    assert tree(models) == before


def test_overlap_is_judged_after_resolving_symlinks(models, tmp_path) -> None:
    (tmp_path / "alias").symlink_to(models)
    with pytest.raises(FileExistsError, match="contains the input"):
        check_not_overlapping(tmp_path / "alias", [models / "tiny"])
    with pytest.raises(FileExistsError, match="is the input"):
        check_not_overlapping(models / "tiny", [tmp_path / "alias" / "tiny"])
    check_not_overlapping(models / "other", [models / "tiny"])  # a sibling is fine


def test_an_output_overlapping_a_pickled_input_is_refused(tmp_path, capsys) -> None:
    torch.save(build_tiny_gpt(**TINY), tmp_path / "model.pt")
    before = tree(tmp_path)
    assert main(convert_args(tmp_path / "model.pt", tmp_path, "--force", "--trust-pickle")) == 2
    assert "contains the input" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_force_replaces_only_model_directories(models, tmp_path, capsys) -> None:
    notes = tree(models / "notes")
    assert main(convert_args(models / "tiny", models / "notes", "--force")) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert tree(models / "notes") == notes
    (tmp_path / "file.txt").write_text("mine")
    assert main(convert_args(models / "tiny", tmp_path / "file.txt", "--force")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "mine"
    shutil.copytree(models / "tiny", tmp_path / "old")
    (tmp_path / "old" / "sub").mkdir()
    assert main(convert_args(models / "tiny", tmp_path / "old", "--force")) == 2
    assert "holds subdirectories (sub)" in capsys.readouterr().err
    (tmp_path / "old" / "sub").rmdir()
    assert main(convert_args(models / "tiny", tmp_path / "old", "--force")) == 0
    assert len(json.loads((tmp_path / "old" / "mixcompile.json").read_text())["recipes"]) == 2
    assert leftovers(tmp_path) == []


def test_library_save_overwrites_only_model_directories(tmp_path) -> None:
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model directory"):
        mc.save(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    mc.save(model, tmp_path / "m")
    mc.save(model, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"]


def test_a_failed_write_keeps_the_old_output(tmp_path, monkeypatch) -> None:
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, tmp_path / "m")
    before = tree(tmp_path / "m")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mixcompile.io.saving.save_model", broken)
    with pytest.raises(OSError, match="No space left"):
        mc.save(model, tmp_path / "m", overwrite=True)
    assert tree(tmp_path / "m") == before and leftovers(tmp_path) == []


# ---- concurrent writers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_writers_exactly_one_wins(models, tmp_path, force) -> None:
    out = tmp_path / "out"
    if force:
        shutil.copytree(models / "tiny", out)
    extra = ["--force"] if force else []
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_CLI,
                str(tmp_path / f"marker{i}"),
                "3",
                *convert_args(models / "tiny", out, *extra),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    winners = [code for code, _ in results if code == 0]
    assert len(winners) == 1, results
    for code, err in results:
        if code:
            assert "is being written by process" in err, err
    assert len(mc.sparse_blocks(mc.load(out))) == 2 and leftovers(tmp_path) == []


def test_a_staging_directory_left_by_a_killed_writer_is_recovered(models, tmp_path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    staging.mkdir()
    (staging / "owner.json").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert main(convert_args(models / "tiny", tmp_path / "out")) == 0
    assert len(mc.sparse_blocks(mc.load(tmp_path / "out"))) == 2 and leftovers(tmp_path) == []


def test_claims_left_by_killed_writers_are_removed_and_live_ones_kept(tmp_path) -> None:
    """A writer killed between making its claim and renaming it into place leaves the claim beside the
    output: the next writer to that output removes it, unless its writer is alive (or has not yet written
    its owner file)."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = os.uname().nodename
    prefix = f".out{STAGING_SUFFIX}"
    claims = {name: tmp_path / f"{prefix}.{name}.claim" for name in ("dead", "alive", "unwritten")}
    for claim in claims.values():
        claim.mkdir()
    (claims["dead"] / "owner.json").write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    (claims["alive"] / "owner.json").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with output_directory(tmp_path / "out", overwrite=False) as out:
        (out.path / "weights").write_text("1")
        out.commit()
    assert not claims["dead"].exists() and claims["alive"].is_dir() and claims["unwritten"].is_dir()
    assert (tmp_path / "out" / "weights").read_text() == "1"


def test_a_live_writer_is_not_mistaken_for_a_dead_one(tmp_path) -> None:
    with (
        output_directory(tmp_path / "out", overwrite=False),
        pytest.raises(FileExistsError, match=f"process {os.getpid()}"),
        output_directory(tmp_path / "out", overwrite=False),
    ):
        pass
    assert leftovers(tmp_path) == []


# ---- interrupted runs clean up --------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 130)])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_convert_leaves_nothing_behind(models, tmp_path, signum, code, existing) -> None:
    out = tmp_path / "out"
    if existing:
        shutil.copytree(models / "tiny", out)
    before = tree(out) if existing else None
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, str(marker), "60", *convert_args(models / "tiny", out, "--force")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    assert leftovers(tmp_path), "the write should be under way in its staging directory"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "nothing was written" in err
    assert leftovers(tmp_path) == []
    assert (tree(out) == before) if existing else not out.exists()


# ---- never hangs, never mislabels -----------------------------------------------------------------------


def test_special_files_fail_at_once_with_their_kind(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir.pt").mkdir()
    cases = [("/dev/zero", "character device"), (tmp_path / "fifo", "FIFO"), (tmp_path / "dir.pt", "")]
    for path, fragment in cases:
        result = subprocess.run(
            [sys.executable, "-m", "mixcompile", "inspect", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_directory_where_the_weights_file_should_be(models, capsys) -> None:
    (models / "tiny" / "model.safetensors").unlink()
    (models / "tiny" / "model.safetensors").mkdir()
    assert main(["inspect", str(models / "tiny")]) == 1
    assert "is a directory; expected the" in capsys.readouterr().err


def _without_root_bypass() -> list[str]:
    """A command prefix that takes away root's permission bypass (tests usually run as root in CI)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable to this process")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_permission_problem_says_permission(source, tmp_path) -> None:
    prefix = _without_root_bypass()
    shutil.copytree(source, tmp_path / "tiny")
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    for locked, target in [
        (tmp_path / "tiny" / "model.safetensors", tmp_path / "tiny"),
        (tmp_path / "tiny" / "mixcompile.json", tmp_path / "tiny"),
        (tmp_path / "model.pt", tmp_path / "model.pt"),
    ]:
        locked.chmod(0o000)
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "mixcompile", "inspect", str(target), "--trust-pickle"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        locked.chmod(0o644)
        assert result.returncode == 1, result.stderr
        assert "permission denied" in result.stderr and str(locked) in result.stderr, result.stderr
        assert "corrupt" not in result.stderr


# ---- every CLI argument is validated up front -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["bench", "{m}", "--batch", "0"], ["--batch", "from 1 to"]),
        (["bench", "{m}", "--batch", "x"], ["--batch", "expected an integer"]),
        (["bench", "{m}", "--seq", "0"], ["--seq", "from 1 to"]),
        (["bench", "{m}", "--seq", "17"], ["--seq 17", "TinyGPT allows (16)"]),
        (["bench", "{m}", "--steps", "0"], ["--steps", "from 1 to"]),
        (["bench", "{m}", "--steps", "-5"], ["--steps", "from 1 to"]),
        (["bench", "{m}", "--device", "tpu"], ["--device", "not a device"]),
        (["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--seed", "-1"], ["--seed", "from 0 to"]),
        (
            ["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--seed", "1.5"],
            ["--seed", "expected an integer"],
        ),
        (["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--experts", "0"], ["--experts", "from 1 to"]),
        (
            ["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--experts", "99999999"],
            ["--experts", "65536"],
        ),
        (
            ["convert", "{m}", "-o", "{o}", "--strategy", "mot", "--group-size", "0"],
            ["--group-size", "from 1 to"],
        ),
        (["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--top-k", "-2"], ["--top-k", "from 1 to"]),
        (
            ["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--experts", "2", "--top-k", "3"],
            ["--top-k 3"],
        ),
        (["convert", "{m}", "-o", "{o}", "--strategy", "moe", "--layers", "a,b"], ["--layers"]),
        (["inspect", "{m}", "--strategy", "moe", "--experts", "-1"], ["--experts", "from 1 to"]),
    ],
)
def test_bad_arguments_name_the_flag_and_range(models, tmp_path, args, fragments, capsys) -> None:
    argv = [a.format(m=models / "tiny", o=tmp_path / "out") for a in args]
    with pytest.raises(SystemExit) as raised:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and err[0].startswith("mixcompile: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("index", ["pytorch_model.bin.index.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("shard", ["../victim/pytorch_model.bin", "ABSOLUTE"])
def test_a_weights_index_naming_files_outside_its_directory_is_refused(
    tmp_path, capsys, index, shard
) -> None:
    """transformers follows an index's shard names as paths: a directory whose index names another
    directory's weights would read them, and `convert --force` onto that directory would then delete the
    very input it read (found by a security review: the .bin index was not checked)."""
    transformers = pytest.importorskip("transformers")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text('{"model_type": "gpt2"}')  # a model directory: --force may replace it
    (victim / "pytorch_model.bin").write_bytes(b"weights the user keeps")
    before = tree(victim)
    attack = tmp_path / "attack"
    attack.mkdir()
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    config.architectures = ["GPT2LMHeadModel"]
    config.to_json_file(attack / "config.json")
    name = str(victim / "pytorch_model.bin") if shard == "ABSOLUTE" else shard
    (attack / index).write_text(json.dumps({"metadata": {}, "weight_map": {"transformer.wte.weight": name}}))
    assert main(["inspect", str(attack)]) == 1
    assert "not a file inside" in capsys.readouterr().err
    assert main(["convert", str(attack), "-o", str(victim), "--force", "--strategy", "moe"]) == 1
    assert "not a file inside" in capsys.readouterr().err
    assert tree(victim) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the opened file's path comes from /proc")
@pytest.mark.parametrize("swap", ["symlink out", "fifo"])
def test_weights_are_read_from_the_file_checked_not_the_path_again(tmp_path, monkeypatch, swap) -> None:
    """The weights file is checked on the descriptor the tensors are read from: one swapped for a symlink
    leading out or for a FIFO after its path was checked is refused (a FIFO would hang the reader)."""
    import mixcompile.io.files as files
    from mixcompile.io.weights import load_weights, read_shapes

    saved = tmp_path / "m"
    mc.save(mc.convert(build_tiny_gpt(), strategy="moe", num_experts=2, top_k=1), saved)
    weights = saved / "model.safetensors"
    (tmp_path / "outside.safetensors").write_bytes(weights.read_bytes())
    model = mc.load(saved)
    weights.unlink()
    if swap == "fifo":
        os.mkfifo(weights)
        monkeypatch.setattr(files, "check_regular_file", lambda *_: None)  # the swap came after the check
    else:
        weights.symlink_to(tmp_path / "outside.safetensors")
    expected = "changed into a FIFO" if swap == "fifo" else "symlink leading outside"
    for read in (lambda: read_shapes([weights]), lambda: load_weights(model, [weights])):
        with pytest.raises(mc.LoadError, match=expected):
            read()
