"""Touching the file system safely: files named by untrusted data, outputs that must never eat inputs.

Every path a saved model names is hostile until checked: it must be a plain file name inside its directory,
resolve inside it, and be a regular file (a FIFO or ``/dev/zero`` would hang a reader). Outputs are written
into a staging directory beside the target (which doubles as a lock, so concurrent writers cannot replace
each other) and swapped into place only when complete; SIGINT / SIGTERM / SIGHUP remove the staging
directory on the way out.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from mixcompile.errors import LoadError, first_line

MAX_JSON_BYTES = 16 << 20  # manifests and configs are small; anything larger is not one of ours
STAGING_SUFFIX = ".mixcompile-staging"
_OWNER = "owner.json"
_NEW, _OLD = "new", "old"


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


def is_model_directory(path: Path) -> str | None:
    """``None`` when ``path`` may be replaced: a directory mixcompile or ``save_pretrained`` wrote, or an
    empty one (nothing to lose); else why not."""
    if path.is_symlink():
        return "it is a symlink"
    if not path.is_dir():
        return "it is not a directory"
    entries = list(path.iterdir())
    if not entries:
        return None
    subdirs = [e.name for e in entries if e.is_dir() and not e.is_symlink()]
    if subdirs:
        return f"it holds subdirectories ({', '.join(sorted(subdirs)[:3])}), which a model directory has not"
    manifest, config = _small_json(path / "mixcompile.json"), _small_json(path / "config.json")
    if manifest.get("format") == "mixcompile" or "model_type" in config or "architectures" in config:
        return None
    return "it has neither a mixcompile.json nor a Hugging Face config.json"


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
    """Refuse an existing ``path`` unless ``overwrite`` and it is a model directory (checked before work)."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or allow replacing it ({flag}).")
    reason = is_model_directory(path)
    if reason is not None:
        raise FileExistsError(
            f"{path} exists and is not a model directory ({reason}); only a directory written by mixcompile "
            "or save_pretrained is replaced. Choose another path."
        )


class OutputDirectory:
    """A reserved output: write into :attr:`path`, then :meth:`commit` puts it in place atomically."""

    def __init__(self, target: Path, staging: Path) -> None:
        self.target = target
        self.staging = staging
        self.path = staging / _NEW

    def commit(self) -> None:
        """Move the finished directory into place; an old model directory there goes only now."""
        old = self.staging / _OLD
        if self.target.exists() or self.target.is_symlink():
            reason = is_model_directory(self.target)
            if reason is not None:  # appeared since the check: never replace something we did not expect
                raise FileExistsError(f"{self.target} appeared while writing and {reason}; nothing replaced.")
            os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
        except OSError:
            if old.exists():
                os.rename(old, self.target)
            raise


@contextlib.contextmanager
def output_directory(
    path: Path, *, overwrite: bool, flag: str = "overwrite=True"
) -> Iterator[OutputDirectory]:
    """Reserve ``path`` for writing; the body fills ``out.path`` and calls ``out.commit()``.

    The staging directory ``.NAME.mixcompile-staging`` beside ``path`` is created atomically, so a second
    writer to the same path fails at once; it is removed when the body ends, however it ends (SIGTERM and
    SIGHUP are turned into exceptions for the duration, in the main thread, so cleanup runs for them too).
    """
    path = Path(path)
    check_output(path, overwrite=overwrite, flag=flag)
    staging = path.parent / f".{path.name}{STAGING_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _reserve(staging, path)
    except OSError as exc:  # named by the output the user gave, not by the staging files beside it
        if exc.filename is None:  # _reserve's own message (another writer holds the output)
            raise
        raise type(exc)(exc.errno, f"cannot write {path} ({exc.strerror or exc}) in {path.parent}") from None
    try:
        with _signals_raise():
            out = OutputDirectory(path, staging)
            out.path.mkdir()
            yield out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reserve(staging: Path, target: Path) -> None:
    """Create ``staging`` with its owner file already in it: a directory made beside it and renamed into
    place, atomically, so a second writer always finds whose it is (a ``mkdir`` followed by the owner's
    write left a moment in which it could not tell, seen as a failed test on a loaded 2-core machine). The
    rename fails where ``staging`` exists, as it is never empty. Claims left by writers killed between
    the two steps are removed first."""
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for claim in staging.parent.glob(f"{glob.escape(staging.name)}.*.claim"):
        existing = _owner(claim)  # None: its owner file is not written yet, so its writer is alive
        if existing is not None and _stale(existing):
            shutil.rmtree(claim, ignore_errors=True)
    for attempt in range(2):
        claim = Path(tempfile.mkdtemp(prefix=f"{staging.name}.", suffix=".claim", dir=staging.parent))
        (claim / _OWNER).write_text(owner)
        try:
            os.rename(claim, staging)
        except OSError:
            shutil.rmtree(claim, ignore_errors=True)
            if not (staging.exists() or staging.is_symlink()):
                raise
            existing = _owner(staging)
            if attempt == 0 and existing is not None and _stale(existing):
                _recover(staging, target)
                continue
            who = f"process {existing['pid']} on {existing['host']}" if existing else "another process"
            raise FileExistsError(
                f"{target} is being written by {who} (its staging directory {staging} exists); wait for it, "
                "or remove that directory if no such process is running."
            ) from None
        return


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


def _recover(staging: Path, target: Path) -> None:
    """A dead writer may have moved the old output aside and not put the new one in: restore the old."""
    old = staging / _OLD
    if old.exists() and not (target.exists() or target.is_symlink()):
        os.rename(old, target)
    shutil.rmtree(staging, ignore_errors=True)


class Terminated(BaseException):
    """SIGTERM / SIGHUP received while writing: unwinds like KeyboardInterrupt, so cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


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
