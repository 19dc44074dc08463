"""The command under interrupts and odd arguments: an interrupt at any moment (while torch is imported,
between the renames of a commit, while cleaning up, while Python shuts down) gives one line and the
promised exit code and says what was written; a model directory is replaced only if it holds nothing else;
bad paths are refused in words naming the argument; warnings are one line. Signals are sent at a chosen
point (a patched call), never after a sleep."""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import mixcompile as mc
from mixcompile import build_tiny_gpt
from mixcompile.cli import main
from mixcompile.io.files import STAGING_SUFFIX

TINY = {"d_model": 16, "n_layer": 2, "n_head": 2, "d_ff": 32, "max_seq": 8}

# SIGTERM once the staging directory's owner file is deleted: while the new output's staging is removed.
TERM_DURING_CLEANUP = """
import os, shutil, signal, sys
real = os.unlink
def unlink(path, *args, **kwargs):
    real(path, *args, **kwargs)
    if os.path.basename(path) == "owner.json":
        os.unlink = real
        os.kill(os.getpid(), signal.SIGTERM)
os.unlink = unlink
from mixcompile.cli import main
sys.exit(main(sys.argv[1:]))
"""

# The console script, with Ctrl-C arriving as torch starts to be imported.
INTERRUPT_WHILE_IMPORTING = """
import os, signal, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        return None
sys.meta_path.insert(0, Interrupt())
from mixcompile.cli import entry_point
entry_point()
"""

# The console script, with Ctrl-C arriving once the command is done, while Python shuts down.
INTERRUPT_AT_EXIT = """
import atexit, os, signal
atexit.register(lambda: os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"])))
from mixcompile.cli import entry_point
entry_point()
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A saved model with one FFN left dense, so converting it again writes an output."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("robust") / "tiny"
    mc.save(mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1, sites=[0]), path)
    return path


def convert_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(src), "-o", str(out), "--strategy", "moe", "--experts", "2", *extra]


def recipes(path: Path) -> int:
    return len(json.loads((path / "mixcompile.json").read_text())["recipes"])


def beside(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if STAGING_SUFFIX in p.name)


def run_script(
    script: str, tmp_path: Path, *args: str, name: str = "script.py", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


# ---- interrupts -----------------------------------------------------------------------------------------


def test_ctrl_c_between_the_renames_of_a_commit_reports_the_replaced_output(
    source, tmp_path, monkeypatch, capsys
) -> None:
    shutil.copytree(source, tmp_path / "out")
    real = os.rename

    def rename(src: Any, dst: Any) -> None:  # the old output has just been moved aside
        real(src, dst)
        if Path(dst).name == "old":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename)
    assert main(convert_args(source, tmp_path / "out", "--force")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "replaced by the complete new model" in err, err
    assert recipes(tmp_path / "out") == 2 and beside(tmp_path) == []


def test_sigterm_while_cleaning_up_leaves_nothing_blocking_the_output(source, tmp_path, capsys) -> None:
    shutil.copytree(source, tmp_path / "out")
    done = run_script(TERM_DURING_CLEANUP, tmp_path, *convert_args(source, tmp_path / "out", "--force"))
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "terminated by SIGTERM after" in done.stderr and "nothing was written" not in done.stderr
    assert recipes(tmp_path / "out") == 2 and beside(tmp_path) == []
    assert main(convert_args(source, tmp_path / "out", "--force")) == 0, capsys.readouterr().err


SIGNALS = [
    ("SIGINT", "interrupted"),
    ("SIGTERM", "terminated by SIGTERM"),
    ("SIGHUP", "terminated by SIGHUP"),
]


@pytest.mark.parametrize(("name", "said"), SIGNALS)
def test_a_signal_while_torch_is_imported_is_one_line_and_its_exit_code(tmp_path, name, said) -> None:
    """SIGTERM and SIGHUP killed the command silently (exit -15) until it had imported torch."""
    done = run_script(INTERRUPT_WHILE_IMPORTING, tmp_path, "plugins", name="mixcompile", env={"SIGNAL": name})
    assert done.returncode == 128 + getattr(signal, name), done.stderr
    assert done.stderr == f"mixcompile: error: {said}; nothing was written\n"


def test_importing_mixcompile_leaves_the_signals_alone() -> None:
    """Only the command exits on a signal while importing; a program importing mixcompile keeps its own."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_importing_mixcompile_leaves_the_cli_unloaded() -> None:
    """The library does not depend on its command: ``import mixcompile`` loads neither the CLI nor argparse
    (torch imports argparse itself, so it is dropped first and must not come back)."""
    script = (
        "import sys, torch; sys.modules.pop('argparse', None); import mixcompile; "
        "print(sorted(m for m in sys.modules if m == 'argparse' or m.startswith('mixcompile.cli')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


@pytest.mark.parametrize("name", [name for name, _ in SIGNALS])
def test_a_signal_while_python_shuts_down_keeps_the_commands_exit_status(tmp_path, name) -> None:
    env = {"SIGNAL": name}
    done = run_script(INTERRUPT_AT_EXIT, tmp_path, "plugins", "--json", name="mixcompile", env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)


# ---- what --force replaces --------------------------------------------------------------------------------


def test_force_refuses_a_checkpoint_folder_holding_more_than_the_model(source, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "checkpoint-500"
    shutil.copytree(source, checkpoint)
    for name in ("optimizer.pt", "trainer_state.json", "notes.txt"):
        (checkpoint / name).write_text("mine")
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(convert_args(source, checkpoint, "--force")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt, optimizer.pt, trainer_state.json" in err, err
    assert "remove them or choose another output" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert (checkpoint / "notes.txt").read_text() == "mine"


class _FullDisk(io.StringIO):
    """A standard output redirected to a file on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_standard_output_is_not_blamed_on_the_model_output(
    source, tmp_path, capsys, monkeypatch
) -> None:
    """``mixcompile convert ... > report.txt`` on a full disk: the model was written, the report was not."""
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "stdout", _FullDisk())
    code = main(convert_args(source, out))
    error = capsys.readouterr().err
    assert code == 1
    assert "could not print to the standard output (no space left on the device)" in error, error
    assert f"the complete new model was written to {out} before that" in error
    assert recipes(out) == 2


class _NoCount(io.StringIO):
    """A standard output wrapper whose write returns None (codecs.StreamWriter, colorama)."""

    def write(self, text: str) -> None:  # type: ignore[override]
        super().write(text)


def test_a_standard_output_whose_write_returns_nothing_works(monkeypatch) -> None:
    stream = _NoCount()
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["plugins"]) == 0
    assert "expert_choice" in stream.getvalue()


# ---- paths ------------------------------------------------------------------------------------------------


def test_nothing_to_convert_creates_no_directories(tmp_path, capsys) -> None:
    torch.save(torch.nn.Linear(4, 4), tmp_path / "lin.pt")
    out = tmp_path / "new" / "sub" / "out"
    assert main(convert_args(tmp_path / "lin.pt", out, "--trust-pickle")) == 0
    assert "nothing to convert" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin.pt"]


@pytest.mark.parametrize("command", [["inspect", ""], ["convert", "", "-o", "x8", "--strategy", "moe"]])
def test_an_empty_input_path_is_refused(source, tmp_path, monkeypatch, capsys, command) -> None:
    shutil.copytree(source, tmp_path / "cwd")  # "" must not be read as the current directory
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(SystemExit) as exit:
        main(command)
    assert exit.value.code == 2
    assert "an empty path" in capsys.readouterr().err
    assert not (tmp_path / "cwd" / "x8").exists()


def test_impossible_paths_are_refused_in_words_naming_the_argument(source, tmp_path, capsys) -> None:
    (tmp_path / "build.py").write_text("mine")
    long_name = tmp_path / ("a" * 300)
    cases = [
        (
            convert_args(source, tmp_path / "build.py" / "out"),
            ["-o: cannot write ", "build.py is a file, not a directory"],
        ),
        (convert_args(source, long_name), ["-o: cannot write ", "too long"]),
        (["inspect", str(long_name)], ["the input ", "too long"]),
        (convert_args(tmp_path / "build.py" / "m", tmp_path / "out"), ["the input ", "is a file, not a"]),
    ]
    for args, fragments in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "[Errno" not in err, err
        assert all(fragment in err for fragment in fragments), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.py"]


# ---- messages ---------------------------------------------------------------------------------------------


def test_library_warnings_are_one_line(source, monkeypatch, capsys) -> None:
    cli = importlib.import_module("mixcompile.cli.main")  # (the package's `main` is the function)

    real = cli.read_model

    def read_model(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("something the user\n    should know", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "read_model", read_model)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["inspect", str(source)]) == 0
    assert capsys.readouterr().err == "mixcompile: warning: something the user should know\n"
    assert warnings.showwarning is not cli._show_warning  # put back for the program calling main()


@pytest.mark.parametrize(
    "command, fragments",
    [
        (["convert"], ["auto (the default", "negative ones count from the end", "--layers=-2,-1"]),
        (["bench"], ["--device DEVICE where to time the models"]),
    ],
)
def test_help_covers_every_accepted_value(command, fragments, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(fragment in text for fragment in fragments), text
