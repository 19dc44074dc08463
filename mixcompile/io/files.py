"""Touching the file system safely: files named by untrusted data, outputs that must never eat inputs.

Every path a saved model names is hostile until checked: it must be a plain file name inside its directory,
resolve inside it, and be a regular file (a FIFO or ``/dev/zero`` would hang a reader). Outputs are written
into a staging directory beside the target (which doubles as a lock, so concurrent writers cannot replace
each other) and swapped into place only when complete; SIGINT / SIGTERM / SIGHUP remove the staging
directory on the way out, and wait while an output is swapped in or the staging directory removed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from types import FrameType
from typing import Any

from mixcompile.errors import ConfigError, LoadError, first_line
from mixcompile.startup import Terminated, raise_terminated

MAX_JSON_BYTES = 16 << 20  # manifests and configs are small; anything larger is not one of ours
STAGING_SUFFIX = ".mixcompile-staging"
_OWNER = "owner.json"
_NEW, _OLD, _REPLACED = "new", "old", "replaced"


def path_argument(value: object, name: str, what: str) -> Path:
    """A path given to the API, refused by name when it is not one or is empty: ``Path("")`` is the current
    directory, which an empty string never meant (the CLI refuses it as well)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}.")
    if os.fspath(value) == "":
        raise ConfigError(f"{name} is empty (Path('') would be the current directory); give {what}.")
    return Path(value)


def check_regular_file(path: Path, what: str = "file") -> os.stat_result:
    """``path`` exists, is a regular file (after symlinks) and is readable; otherwise a one-line error.

    Checked with ``stat`` before anything opens it: opening a FIFO blocks and reading a device never ends.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LoadError(f"{path} does not exist.") from None
    except PermissionError:
        raise LoadError(f"{path}: permission denied (cannot look at the {what}).") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read the {what}: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise LoadError(f"{path} is a directory; expected the {what} (a regular file).")
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(f"{path} is a {_file_type(info.st_mode)}, not a regular file; expected the {what}.")
    if not os.access(path, os.R_OK):
        raise LoadError(f"{path}: permission denied (cannot read the {what}).")
    return info


def read_bytes(
    path: Path, what: str = "file", *, limit: int | None = None, within: Path | None = None
) -> bytes:
    """The contents of a regular file, refusing files over ``limit`` bytes before reading them; with
    ``within``, the file read must be one :func:`confined_file` accepts there (see :func:`opened_file`)."""
    with opened_file(path, what, within=within) as (descriptor, info):
        if limit is not None and info.st_size > limit:
            raise LoadError(f"{path} is {info.st_size:,} bytes, too large for a {what} (limit {limit:,}).")
        with os.fdopen(os.dup(descriptor), "rb") as reader:
            data = reader.read(limit + 1 if limit is not None else -1)
    if limit is not None and len(data) > limit:
        raise LoadError(f"{path} grew past {limit:,} bytes while being read; too large for a {what}.")
    return data


@contextlib.contextmanager
def opened_file(
    path: Path, what: str = "file", *, within: Path | None = None
) -> Iterator[tuple[int, os.stat_result]]:
    """``path`` opened for reading: its descriptor and what ``fstat`` says of it. With ``within``, the file
    opened must be one :func:`confined_file` accepts there.

    What is read is checked on the opened descriptor, not on the path again: a file swapped for a FIFO or
    a symlink leading out between the check and the read is refused, not read (or waited on)."""
    check_regular_file(path, what)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise LoadError(f"{path}: permission denied (cannot read the {what}).") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read the {what}: {exc.strerror or exc}.") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError(f"{path} changed into a {_file_type(info.st_mode)} while being read; refused.")
        real = _opened_path(descriptor)
        if within is not None and real is not None and not _inside(real, within.resolve()):
            raise LoadError(
                f"{path} changed into a symlink leading outside {within} while being read; refused."
            )
        yield descriptor, info
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def reopenable(path: Path, what: str = "file", *, within: Path | None = None) -> Iterator[str]:
    """A path that opens the very file :func:`opened_file` checked, for readers that take only a path
    (safetensors memory-maps its files): ``/proc/self/fd/N`` where the system has it, else ``path``."""
    with opened_file(path, what, within=within) as (descriptor, _):
        link = f"/proc/self/fd/{descriptor}"
        yield link if os.path.exists(link) else str(path)


def _opened_path(descriptor: int) -> Path | None:
    """The real path of an open file where the system says it (Linux), else ``None``."""
    link = f"/proc/self/fd/{descriptor}"
    try:
        return Path(os.readlink(link))
    except OSError:
        return None


def _inside(real: Path, root: Path) -> bool:
    """Whether a file's real path is directly in ``root``, or, for a Hugging Face Hub cache snapshot
    (``.../snapshots/<revision>``), in the cache's ``blobs`` folder its symlinks lead to."""
    hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    return real.parent == root or real.parent == hub_blobs


def read_json_object(path: Path, what: str, *, within: Path | None = None) -> dict[str, Any]:
    """A small JSON file holding an object; anything else is a one-line :class:`LoadError` (``within``: see
    :func:`read_bytes`)."""
    data = read_bytes(path, what, limit=MAX_JSON_BYTES, within=within)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoadError(f"{path} is not valid JSON ({first_line(exc)}); the {what} is damaged.") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path} holds a JSON {type(value).__name__}, expected an object ({what}).")
    return value


def confined_file(directory: Path, name: object, field: str) -> Path:
    """The file ``name`` (a field of an untrusted manifest) inside ``directory``, or a :class:`LoadError`.

    Only a plain file name is accepted: no separators, no ``..``, not absolute, and its real path (after
    symlinks) must stay inside the directory (or, in a Hugging Face Hub cache snapshot, lead to the cache's
    blobs). Read it with ``within=directory`` (:func:`read_bytes`), so that holds for what is read.
    """
    if not isinstance(name, str) or not name:
        raise LoadError(f"{field} must be a file name (a string), got {name!r}.")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name):
        raise LoadError(
            f"{field} {name!r} is not a plain file name inside {directory}: paths outside the directory "
            "are refused."
        )
    path = directory / name
    try:
        real = path.resolve()
    except OSError as exc:  # a symlink loop, or one changing while it is resolved
        why = exc.strerror or exc
        raise LoadError(f"{field} {name!r} in {directory} cannot be resolved ({why}).") from None
    if not _inside(real, directory.resolve()):
        raise LoadError(f"{field} {name!r} is a symlink leading outside {directory}; refused.")
    check_regular_file(path, field)
    return path


# ---- outputs --------------------------------------------------------------------------------------------


def check_not_overlapping(output: Path, inputs: Iterable[Path], *, flag: str = "the output") -> None:
    """Refuse an output equal to, inside, or an ancestor of any input (after resolving symlinks)."""
    target = output.resolve()
    for source in inputs:
        real = source.resolve()
        if target == real:
            relation = "is"
        elif real in target.parents:
            relation = "is inside"
        elif target in real.parents:
            relation = "contains"
        else:
            continue
        raise FileExistsError(
            f"{flag} {output} {relation} the input {source}: writing there would overwrite or delete the "
            "input; choose another output."
        )


def input_paths(path: Path) -> list[Path]:
    """What reading ``path`` touches: the path and, for a directory, where its entries really live."""
    paths = [path]
    if path.is_dir():
        with contextlib.suppress(OSError):
            paths += [entry.resolve() for entry in path.iterdir() if entry.is_symlink()]
    return paths


# What a model directory holds, and nothing else: mixcompile.save's files, save_pretrained's (weights, sharded
# or not, and their index), the tokenizer's (see mixcompile.io.tokenizer_files) and a model card.
_MODEL_FILES = frozenset(
    {
        "mixcompile.json",
        "config.json",
        "generation_config.json",
        "mixcompile_hf.py",
        "base.pt",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "README.md",
        ".gitattributes",
    }
)
_MODEL_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def is_model_directory(path: Path) -> str | None:
    """``None`` when ``path`` may be replaced: a directory mixcompile or ``save_pretrained`` wrote, or an
    empty one (nothing to lose); else why not."""
    refusal = _refusal(path)
    return refusal[0] if refusal else None


def _refusal(path: Path) -> tuple[str, bool] | None:
    """Why ``path`` may not be replaced, and whether removing files from it would change that. Replacing
    deletes every entry, so every entry must be one a model directory holds: a folder that merely has a
    ``config.json`` (a training checkpoint beside its optimizer state, say) is not one."""
    if path.is_symlink():
        return "it is a symlink", False
    if not path.is_dir():
        return "it is not a directory", False
    entries = list(path.iterdir())
    if not entries:
        return None
    subdirs = [e.name for e in entries if e.is_dir() and not e.is_symlink() and not _chat_templates(e)]
    if subdirs:
        names = ", ".join(sorted(subdirs)[:3])
        return f"it holds subdirectories ({names}), which a model directory has not", True
    manifest, config = _small_json(path / "mixcompile.json"), _small_json(path / "config.json")
    if not (manifest.get("format") == "mixcompile" or "model_type" in config or "architectures" in config):
        return "it has neither a mixcompile.json nor a Hugging Face config.json", False
    others = _foreign_files(path, [entry.name for entry in entries if not _chat_templates(entry)], config)
    if others:
        return f"it also holds files that are not a model's: {_some(others)}", True
    return None


def _foreign_files(path: Path, names: list[str], config: dict[str, Any]) -> list[str]:
    """The entries of ``path`` that neither mixcompile, ``save_pretrained`` nor the tokenizer writes; the
    tokenizer class's own vocabulary names (which import transformers) are looked up only if needed."""
    from mixcompile.io.tokenizer_files import tokenizer_file_names  # it reads JSON with this module

    known = _MODEL_FILES | _code_files(path, config)
    known |= _code_files(path, _small_json(path / "tokenizer_config.json"))
    others = [n for n in names if n not in known and not any(fnmatchcase(n, p) for p in _MODEL_PATTERNS)]
    tokenizer = tokenizer_file_names(path, others)
    return sorted(name for name in others if name not in tokenizer)


def _chat_templates(entry: Path) -> bool:
    """The ``additional_chat_templates`` folder (of ``.jinja`` files) a tokenizer's save_pretrained writes."""
    return (
        entry.name == "additional_chat_templates"
        and entry.is_dir()
        and not entry.is_symlink()
        and all(f.is_file() and f.suffix == ".jinja" for f in entry.iterdir())
    )


def _code_files(path: Path, config: dict[str, Any]) -> set[str]:
    """The ``.py`` files of a config with an ``auto_map``: ``save_pretrained`` copies the modules it names
    and the modules those import relatively, so every ``.py`` file beside such a config is the model's."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return set()
    return {entry.name for entry in path.glob("*.py")}


def _some(names: list[str]) -> str:
    """A few names for a one-line message."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _small_json(path: Path) -> dict[str, Any]:
    """A regular, small JSON object file, or ``{}`` for anything else (it only decides "is this ours")."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def check_output(path: Path, *, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and it is a model directory, and one that cannot
    name a directory at all (checked before work)."""
    problem = path_problem(path)
    if problem is not None:
        raise OSError(f"cannot write {path}: {problem}")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or allow replacing it ({flag}).")
    refusal = _refusal(path)
    if refusal is not None:
        reason, removable = refusal
        remedy = "remove them or choose another output" if removable else "choose another output"
        raise FileExistsError(
            f"{path} exists and is not a model directory ({reason}); only a directory written by mixcompile "
            f"or save_pretrained is replaced: {remedy}."
        )


def path_problem(path: Path) -> str | None:
    """Why ``path`` cannot name a file at all, in words (a file where a folder should be, a name too long
    for the file system); ``None`` when it can, whether or not it exists."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        blocker = _file_in_the_way(path)
        return f"{blocker} is a file, not a directory" if blocker else describe_os_error(errno.ENOTDIR)
    except OSError as exc:
        return describe_os_error(exc.errno, exc.strerror or "")
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` when it is not a directory."""
    for parent in path.parents:
        try:
            info = os.stat(parent)
        except OSError:
            continue
        return None if stat.S_ISDIR(info.st_mode) else parent
    return None


_ERRNO_WORDS = {
    errno.ENAMETOOLONG: "a name in the path is too long for the file system",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "something is already there",
}


def describe_os_error(code: int | None, fallback: str = "") -> str:
    """An OS error in words, without the ``[Errno N]`` a user has no use for."""
    if code in _ERRNO_WORDS:
        return _ERRNO_WORDS[code]
    words = fallback or (os.strerror(code) if code else "an operating system error")
    return words[:1].lower() + words[1:]


class OutputDirectory:
    """A reserved output: write into :attr:`path`, then :meth:`commit` puts it in place atomically.

    :attr:`committed` says whether the new output is in place and :attr:`replaced` whether an old one made
    way for it, so that an interrupted command can say what happened."""

    def __init__(
        self, target: Path, staging: Path, guard: _SignalGuard | None = None, *, overwrite: bool = True
    ) -> None:
        self.target = target
        self.overwrite = overwrite
        self.staging = staging
        self.path = staging / _NEW
        self.committed = False
        self.replaced = False
        self._guard = guard or _SignalGuard()
        self._reserved = False
        self._created: list[Path] = []

    def commit(self) -> None:
        """Move the finished directory into place; an old model directory there goes only now. Signals wait
        until both renames are done, and a failure between them puts the old output back: the target holds
        the old output or the new one, never neither."""
        with self._guard.deferred():
            self._swap()
        self._guard.raise_pending()

    def _swap(self) -> None:
        old = self.staging / _OLD
        if self.target.exists() or self.target.is_symlink():
            if not self.overwrite:  # appeared since the check (or put back from a killed writer's staging)
                raise FileExistsError(f"{self.target} appeared while writing; nothing replaced.")
            reason = is_model_directory(self.target)
            if reason is not None:  # appeared since the check: never replace something we did not expect
                raise FileExistsError(f"{self.target} appeared while writing and {reason}; nothing replaced.")
            os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
        except BaseException:
            _restore(old, self.target)
            raise
        self.committed, self.replaced = True, old.exists()

    def _reserve(self) -> None:
        """Create the target's missing parents (remembered, to be removed if nothing is written) and claim
        the staging directory; errors name the output, in words."""
        try:
            self._created = _make_parents(self.target.parent)
            _reserve(self.staging, self.target)
        except OSError as exc:
            _remove_created(self._created)
            if isinstance(exc, FileExistsError) and exc.filename is None:  # _reserve's own message
                raise
            raise _output_error(exc, self.target) from None
        self._reserved = True

    def _clean_up(self) -> None:
        """Remove the staging directory (after putting an old output back where nothing replaced it) and,
        if nothing was written, the parents made for the output."""
        if self._reserved:
            _dispose(self.staging, self.target)
        if not self.committed:
            _remove_created(self._created)


def _check_not_current(path: Path) -> None:
    """Replacing the directory this process runs in (or one holding it) would leave the process, and a shell
    started there, in a deleted directory."""
    try:
        here = path.resolve() if path.exists() else None
    except OSError:  # an impossible path: check_output says what is wrong with it
        return
    cwd = Path.cwd()
    if here is not None and here in (cwd, *cwd.parents):
        raise ConfigError(
            f"{path} is the current directory or holds it: replacing it would leave this process (and a "
            "shell started there) in a deleted directory. Change to another directory first, or write the "
            "output elsewhere."
        )


@contextlib.contextmanager
def output_directory(
    path: Path, *, overwrite: bool, flag: str = "overwrite=True"
) -> Iterator[OutputDirectory]:
    """Reserve ``path`` for writing; the body fills ``out.path`` and calls ``out.commit()``.

    The staging directory ``.NAME.mixcompile-staging`` beside ``path`` is created atomically, so a second
    writer to the same path fails at once; it is removed when the body ends, however it ends. In the main
    thread SIGTERM and SIGHUP are turned into exceptions for the duration, so cleanup runs for them too, and
    SIGINT / SIGTERM / SIGHUP wait while the staging directory is claimed, swapped in or removed (an
    interrupt there would leave a half-removed directory blocking the output, or no output at all).
    """
    path = Path(path)
    _check_not_current(path)
    check_output(path, overwrite=overwrite, flag=flag)
    # ".." names no directory of its own (its name is ".."): the staging directory, named after the target,
    # would land inside it. check_output refused a symlink there, so the resolved path is the same one.
    if path.name in ("", ".", ".."):
        path = path.resolve()
    guard = _SignalGuard()
    guard.install()
    try:
        out = OutputDirectory(path, path.parent / f".{path.name}{STAGING_SUFFIX}", guard, overwrite=overwrite)
        try:
            with guard.deferred():
                out._reserve()
            guard.raise_pending()
            out.path.mkdir()
            yield out
        finally:
            with guard.deferred():
                out._clean_up()
    finally:
        guard.uninstall()
    guard.raise_pending()


def _output_error(exc: OSError, target: Path) -> OSError:
    """``exc`` (of the same type, so callers can still catch ``PermissionError``) named by the output the
    user gave, not by the staging files beside it, and in words."""
    error = type(exc)(f"cannot write {target}: {path_problem(target) or describe_os_error(exc.errno)}")
    error.errno = exc.errno
    return error


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created, outermost first."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    created: list[Path] = []
    try:
        for candidate in reversed(missing):
            try:
                candidate.mkdir()
            except FileExistsError:
                if not candidate.is_dir():
                    raise
            else:
                created.append(candidate)
    except OSError:
        _remove_created(created)
        raise
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the directories ``_make_parents`` created, innermost first, where they are still empty."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _reserve(staging: Path, target: Path) -> None:
    """Create ``staging`` with its owner file already in it: a directory made beside it and renamed into
    place, atomically, so a second writer always finds whose it is (a ``mkdir`` followed by the owner's
    write left a moment in which it could not tell, seen as a failed test on a loaded 2-core machine). The
    rename fails where ``staging`` exists, as it is never empty. Hence a staging directory without a readable
    owner file is abandoned (one whose removal was cut short), like one whose writer is gone: it is
    recovered. Claims and removals left by writers killed before finishing them are removed first."""
    _sweep(staging, target)
    for attempt in range(3):
        claim = Path(tempfile.mkdtemp(prefix=f"{staging.name}.", suffix=".claim", dir=staging.parent))
        (claim / _OWNER).write_text(json.dumps(_me()))
        try:
            os.rename(claim, staging)
        except OSError:
            shutil.rmtree(claim, ignore_errors=True)
            kind = _kind(staging)
            if kind != "directory":
                if kind is not None:
                    raise FileExistsError(
                        f"{staging} is in the way of writing {target}: it is not a staging directory "
                        "mixcompile made; remove it."
                    ) from None
                if attempt == 2:
                    raise
                continue  # its writer removed it just now: try again
            existing = _owner(staging)
            if attempt < 2 and (existing is None or _stale(existing)):
                _recover(staging, target, existing)
                continue
            who = f"process {existing['pid']} on {existing['host']}" if existing else "another process"
            raise FileExistsError(
                f"{target} is being written by {who} (its staging directory {staging} exists); wait for it, "
                "or remove that directory if no such process is running."
            ) from None
        return


def _kind(path: Path) -> str | None:
    """``"directory"``, ``"other"`` or ``None`` (nothing there), from one ``lstat``: two looks could see a
    writer's staging directory renamed away and claimed again in between."""
    try:
        return "directory" if stat.S_ISDIR(os.lstat(path).st_mode) else "other"
    except FileNotFoundError:
        return None


def _sweep(staging: Path, target: Path) -> None:
    """Remove what writers killed half-way left beside ``staging``: claims whose writer is gone (a claim
    without an owner file is kept: its writer may be about to write it) and removals (``.trash``)."""
    for claim in staging.parent.glob(f"{glob.escape(staging.name)}.*.claim"):
        existing = _owner(claim)
        if (existing is not None and _stale(existing)) or (existing is None and _older_than(claim, 60.0)):
            shutil.rmtree(claim, ignore_errors=True)
    for trash in staging.parent.glob(f"{glob.escape(staging.name)}.*.trash"):
        existing = _owner(trash)
        if existing is None or _stale(existing):
            _dispose(trash, target)


def _older_than(path: Path, seconds: float) -> bool:
    """A claim without its owner file this old was left by a writer killed between making it and writing
    the file (a live writer writes it at once)."""
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _owner(staging: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((staging / _OWNER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _stale(owner: dict[str, Any]) -> bool:
    """A staging directory whose writer on this host is gone (killed with SIGKILL, say)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _recover(staging: Path, target: Path, judged: dict[str, Any] | None) -> None:
    """An abandoned staging directory: moved aside first (so only one recoverer acts on it, and a writer
    that claimed the name since it was judged keeps its claim), then disposed of."""
    trash = _trash_name(staging)
    try:
        os.rename(staging, trash)
    except OSError:
        return  # gone already: another writer recovered it
    if _owner(trash) != judged:  # a new writer's claim, made between the look and the move: give it back
        with contextlib.suppress(OSError):
            os.rename(trash, staging)
        return
    _dispose(trash, target)


def _dispose(directory: Path, target: Path) -> None:
    """Delete a staging directory: moved to a ``.trash`` name first, so the output's name is free at once
    and a removal cut short blocks nothing. A dead writer may have moved the old output aside and not put
    the new one in (its ``new`` is still beside ``old``): that old output is put back first, and kept if it
    cannot be. Any other ``old`` is one a new output replaced: it is renamed ``replaced`` before the
    removal starts, so a removal cut short never leaves an ``old`` a later writer would put back."""
    old = directory / _OLD
    if (directory / _NEW).exists() and not _restore(old, target):
        return
    with contextlib.suppress(OSError):
        os.rename(old, directory / _REPLACED)
    trash = directory if directory.name.endswith(".trash") else _trash_name(directory)
    if trash != directory:
        try:
            os.rename(directory, trash)
        except OSError:
            trash = directory
    shutil.rmtree(trash, ignore_errors=True)


def _restore(old: Path, target: Path) -> bool:
    """Put an output moved aside back where nothing has replaced it; ``False`` if it is still aside."""
    if not old.exists() or target.exists() or target.is_symlink():
        return True
    try:
        os.rename(old, target)
    except OSError:
        return False
    return True


def _trash_name(staging: Path) -> Path:
    return staging.parent / f"{staging.name}.{uuid.uuid4().hex[:12]}.trash"


_GUARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _SignalGuard:
    """SIGINT / SIGTERM / SIGHUP as exceptions, so cleanup runs for each, but held back inside
    :meth:`deferred` (what must not stop half-way: swapping an output in, cleaning up) and raised after it.
    Only signals left to Python's defaults are handled, and only in the main thread (where handlers run)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._depth = 0
        self._pending: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _GUARDED:
            # Python's defaults, or the command's (which raise too, but hold nothing back)
            sigint = signum == signal.SIGINT
            defaults = (signal.default_int_handler,) if sigint else (signal.SIG_DFL, raise_terminated)
            if signal.getsignal(signum) in defaults:
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def raise_pending(self) -> None:
        """Raise for a signal held back, once nothing holds signals back any more."""
        if self._pending is not None and not self._depth:
            signum, self._pending = self._pending, None
            raise _interrupt(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._depth:
            raise _interrupt(signum)
        if self._pending is None:
            self._pending = signum


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"
