"""Replacing an output: the old one or the new one is always in place, interrupts never leave a directory
blocking the output, only a folder holding nothing but a model's files is replaced, and a write that writes
nothing creates nothing. Interrupts are real signals, sent by this process to itself at a chosen point."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mixcompile as mc
from mixcompile import build_tiny_gpt
from mixcompile.io.files import STAGING_SUFFIX, is_model_directory, output_directory
from mixcompile.startup import Terminated

TINY = {"d_model": 16, "n_layer": 1, "n_head": 2, "d_ff": 32, "max_seq": 8}
INTERRUPTS = [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)]


def model_directory(path: Path, weights: str) -> Path:
    """A directory the way save_pretrained leaves one (contents only need to be told apart)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "model.safetensors").write_text(weights)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def beside(parent: Path) -> list[str]:
    """What output handling left beside the outputs: staging directories, claims, removals."""
    return sorted(p.name for p in parent.iterdir() if STAGING_SUFFIX in p.name)


def after_call(
    monkeypatch: pytest.MonkeyPatch, name: str, when: Callable[..., bool], action: Callable[[], None]
) -> None:
    """Run ``action`` once, right after the first call of ``os.<name>`` for which ``when(*args)`` holds."""
    real = getattr(os, name)
    fired: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not fired and when(*args):
            fired.append(True)
            action()
        return result

    monkeypatch.setattr(os, name, wrapper)


def send(signum: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), signum)


def fill(out: Any) -> None:
    """The new output, written where the output directory says."""
    out.path.rmdir()
    model_directory(out.path, "new")


# ---- an interrupted commit leaves the old output or the new one -------------------------------------------


@pytest.mark.parametrize("signum, raised", INTERRUPTS)
def test_a_signal_between_the_two_renames_waits_until_the_new_output_is_in_place(
    tmp_path, monkeypatch, signum, raised
) -> None:
    model_directory(tmp_path / "out", "old")
    after_call(monkeypatch, "rename", lambda src, dst: Path(dst).name == "old", send(signum))
    with pytest.raises(raised), output_directory(tmp_path / "out", overwrite=True) as out:
        fill(out)
        out.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == "new"
    assert out.committed and out.replaced
    assert beside(tmp_path) == []


def test_an_exception_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch) -> None:
    """What no handler can hold back (an exception from a handler of the program's own) still leaves the
    old output in place."""
    model_directory(tmp_path / "out", "old")
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name == "new" and Path(dst) == tmp_path / "out":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), output_directory(tmp_path / "out", overwrite=True) as out:
        fill(out)
        out.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == "old"
    assert not out.committed and beside(tmp_path) == []


# ---- cleaning up is never cut short, and what was cut short blocks nothing -------------------------------


@pytest.mark.parametrize("commit", [False, True])
def test_a_signal_while_the_staging_directory_is_removed_waits_until_it_is_gone(
    tmp_path, monkeypatch, commit
) -> None:
    model_directory(tmp_path / "out", "old")
    after_call(monkeypatch, "unlink", lambda name, *_, **__: str(name) == "owner.json", send(signal.SIGINT))
    with pytest.raises(KeyboardInterrupt), output_directory(tmp_path / "out", overwrite=True) as out:
        fill(out)
        if commit:
            out.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == ("new" if commit else "old")
    assert beside(tmp_path) == []


def test_a_staging_directory_without_its_owner_file_is_abandoned(tmp_path) -> None:
    """A staging directory is renamed into place with its owner file in it, so one without is a removal
    cut short (or damage), never a live writer's: the next writer recovers it, restoring an old output
    that was moved aside."""
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    staging.mkdir()
    model_directory(staging / "old", "old")
    (staging / "new").mkdir()
    with pytest.raises(RuntimeError), output_directory(tmp_path / "out", overwrite=True):
        assert contents(tmp_path / "out")["model.safetensors"] == "old"
        raise RuntimeError("the new write fails")
    assert contents(tmp_path / "out")["model.safetensors"] == "old"
    staging.mkdir()
    (staging / "owner.json").write_text("{not json")
    with output_directory(tmp_path / "out", overwrite=True) as out:
        fill(out)
        out.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == "new" and beside(tmp_path) == []


def test_a_live_writers_staging_directory_still_blocks(tmp_path) -> None:
    with output_directory(tmp_path / "out", overwrite=False) as first:
        with (
            pytest.raises(FileExistsError, match=f"process {os.getpid()}"),
            output_directory(tmp_path / "out", overwrite=False),
        ):
            pass
        fill(first)
        first.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == "new" and beside(tmp_path) == []


def test_removals_cut_short_are_swept(tmp_path) -> None:
    trash = tmp_path / f".out{STAGING_SUFFIX}.0123456789ab.trash"
    trash.mkdir()
    (trash / "model.safetensors").write_text("half removed")
    with output_directory(tmp_path / "out", overwrite=False) as out:
        fill(out)
        out.commit()
    assert beside(tmp_path) == []


# ---- only a folder of model files is replaced ------------------------------------------------------------


def trainer_checkpoint(path: Path) -> Path:
    model_directory(path, "weights")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "notes.txt"):
        (path / name).write_text("mine")
    return path


def test_a_folder_with_more_than_a_model_is_not_replaced(tmp_path) -> None:
    checkpoint = trainer_checkpoint(tmp_path / "checkpoint-500")
    before = contents(checkpoint)
    reason = is_model_directory(checkpoint)
    assert reason is not None and "notes.txt, optimizer.pt, rng_state.pth and 2 more" in reason
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    with pytest.raises(FileExistsError) as error:
        mc.save(model, checkpoint, overwrite=True)
    message = str(error.value)
    assert "not a model directory" in message and "remove them or choose another output" in message
    assert "\n" not in message
    assert contents(checkpoint) == before


def test_what_save_pretrained_the_tokenizer_and_a_model_card_leave_is_replaced(tmp_path) -> None:
    path = model_directory(tmp_path / "hf", "weights")
    (path / "model.safetensors").unlink()
    config = {"model_type": "luke", "auto_map": {"AutoModel": "org/repo--modeling_luke_x.LukeX"}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LukeTokenizer"}))
    names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "generation_config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "entity_vocab.json",  # LukeTokenizer's own vocabulary file
        "spiece.model",
        "chat_template.jinja",
        "modeling_luke_x.py",
        "README.md",
        ".gitattributes",
    ]
    for name in names:
        (path / name).write_text("x")
    assert is_model_directory(path) is None
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    mc.save(model, path, overwrite=True)
    assert (path / "mixcompile.json").is_file() and not (path / "vocab.json").exists()


def test_the_current_directory_or_one_holding_it_is_refused(tmp_path, monkeypatch) -> None:
    """Replacing the directory a process runs in (".", or ".." from inside) leaves it, and the shell it
    was started from, in a deleted directory: refused before anything is written (the staging directory,
    named after ".", also landed inside the target before)."""
    model_directory(tmp_path / "out", "old")
    (tmp_path / "out" / "sub").mkdir()
    model = mc.convert(build_tiny_gpt(**TINY), strategy="moe", num_experts=2, top_k=1)
    for cwd, target in (("out", "."), ("out/sub", ".."), ("out", str(tmp_path / "out"))):
        monkeypatch.chdir(tmp_path / cwd)
        refused = pytest.raises(mc.ConfigError, match="is the current directory or holds it")
        with refused, output_directory(Path(target), overwrite=True):
            pass
        with pytest.raises(mc.ConfigError, match="is the current directory or holds it"):
            mc.save(model, target, overwrite=True)
    (tmp_path / "out" / "sub").rmdir()
    assert contents(tmp_path / "out")["model.safetensors"] == "old" and beside(tmp_path) == []
    monkeypatch.chdir(tmp_path)
    mc.save(model, "out/sub/..", overwrite=True)  # ".." from elsewhere: staged beside the target
    assert (tmp_path / "out" / "mixcompile.json").is_file() and beside(tmp_path) == []


# ---- a write that writes nothing creates nothing -----------------------------------------------------------


def test_parents_made_for_an_output_go_when_nothing_is_written(tmp_path) -> None:
    with output_directory(tmp_path / "new" / "sub" / "out", overwrite=False) as out:
        assert out.path.is_dir()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), output_directory(tmp_path / "new" / "out", overwrite=False):
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
    with output_directory(tmp_path / "new" / "out", overwrite=False) as out:
        fill(out)
        out.commit()
    assert contents(tmp_path / "new" / "out")["model.safetensors"] == "new"


def test_an_output_under_a_file_is_refused_in_words(tmp_path) -> None:
    (tmp_path / "build.py").write_text("mine")
    with pytest.raises(OSError) as error, output_directory(tmp_path / "build.py" / "out", overwrite=False):
        pass
    assert "build.py is a file, not a directory" in str(error.value) and "[Errno" not in str(error.value)
    with pytest.raises(OSError) as error, output_directory(tmp_path / ("a" * 300), overwrite=False):
        pass
    assert "too long" in str(error.value) and "[Errno" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.py"]


# ---- what killed writers leave: only a swap cut between its renames gives its old output back ------------


def test_an_old_output_a_new_one_replaced_is_never_put_back(tmp_path) -> None:
    """A removal cut short left a replaced (half-deleted) output in a .trash; a writer killed between its
    renames left the latest output aside in the staging directory, beside its new one. The sweep put the
    stale, half-deleted one back first, so the latest was then deleted (a review's SIGKILL sequence)."""
    trash = tmp_path / f".out{STAGING_SUFFIX}.0123456789ab.trash"
    trash.mkdir()
    (trash / "old").mkdir()
    (trash / "old" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # its weights deleted
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    staging.mkdir()
    model_directory(staging / "old", "latest")
    model_directory(staging / "new", "cut short")
    with (
        pytest.raises(FileExistsError, match="appeared while writing"),
        output_directory(tmp_path / "out", overwrite=False) as out,
    ):
        fill(out)
        out.commit()  # the latest output is back: overwrite=False must not replace it
    assert contents(tmp_path / "out")["model.safetensors"] == "latest" and beside(tmp_path) == []


def test_a_committed_writers_leftover_old_output_is_removed_not_restored(tmp_path) -> None:
    """Killed after its new output went in: its ``old`` is the replaced one, whatever happens later."""
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    staging.mkdir()
    model_directory(staging / "old", "replaced")
    with output_directory(tmp_path / "out", overwrite=False) as out:
        fill(out)
        out.commit()
    assert contents(tmp_path / "out")["model.safetensors"] == "new" and beside(tmp_path) == []


def test_custom_code_and_chat_templates_save_pretrained_writes_are_a_model_directory(tmp_path) -> None:
    """save_pretrained copies the modules an auto_map names and the ones they import (helpers.py), and a
    tokenizer's extra chat templates go in additional_chat_templates/: both were refused for --force."""
    path = model_directory(tmp_path / "custom", "weights")
    (path / "config.json").write_text(
        json.dumps({"model_type": "my", "auto_map": {"AutoModel": "modeling_my.M"}})
    )
    for name in ("modeling_my.py", "helpers.py"):
        (path / name).write_text("")
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    assert is_model_directory(path) is None
    (path / "additional_chat_templates" / "notes.txt").write_text("mine")
    assert "additional_chat_templates" in (is_model_directory(path) or "")
