"""The tokenizer's files of a Hugging Face directory, carried over by ``mixcompile convert`` so that a
converted directory is a drop-in replacement for the dense one (``AutoTokenizer.from_pretrained`` works
on it too)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

from mixcompile.errors import LoadError, first_line
from mixcompile.io.files import read_json_object

# Files a tokenizer or processor reads beside the model, besides its class's own ``vocab_files_names``
# (transformers has no one list of them: these are its constants, and the usual vocabulary files).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
_TOKENIZER_PATTERNS = ("tokenizer.*.json", "*.model", "*.spm", "*.tiktoken")
MAX_TOKENIZER_BYTES = 256 << 20  # the largest vocabularies are tens of MB


def copy_tokenizer_files(source: Path, target: Path) -> tuple[list[str], list[str]]:
    """Copy the tokenizer's files of the Hugging Face directory ``source`` into the new directory ``target``,
    so that a converted directory is a drop-in replacement for the dense one; returns (copied, skipped with
    why). Each is what ``AutoTokenizer.from_pretrained(source)`` would read: a plain name in ``source``,
    symlinks followed as transformers follows them (the Hub cache is made of them; the model's own config
    and weights are read the same way), and only a regular file of at most ``MAX_TOKENIZER_BYTES`` (a FIFO
    or a device is skipped, never waited on). Nothing in ``target`` is overwritten."""
    copied, skipped = [], []
    for name in sorted(tokenizer_file_names(source, [entry.name for entry in source.iterdir()])):
        file = source / name
        try:
            _copy_new(file, target / name)
        except (LoadError, OSError) as exc:
            skipped.append(f"{name} ({first_line(exc)})")
        else:
            copied.append(name)
    return copied, skipped


def tokenizer_file_names(directory: Path, names: Iterable[str]) -> set[str]:
    """Which of ``names`` (entries of ``directory``) a tokenizer or processor reads: the usual names and
    patterns, and the ``vocab_files_names`` of the tokenizer class its ``tokenizer_config.json`` names,
    looked up (importing transformers) only for names left over, and none without transformers."""
    names = set(names)
    found = {n for n in names if n in _TOKENIZER_FILES or any(fnmatchcase(n, p) for p in _TOKENIZER_PATTERNS)}
    others = names - found
    if others and (directory / "tokenizer_config.json").is_file():
        with contextlib.suppress(ImportError):  # no transformers: no tokenizer class to ask
            found |= others & _vocab_files_of(directory)
    return found


def _vocab_files_of(source: Path) -> set[str]:
    """The file names the tokenizer class named in ``tokenizer_config.json`` reads (its
    ``vocab_files_names``); a class transformers does not have adds none."""
    try:
        class_name = read_json_object(source / "tokenizer_config.json", "tokenizer config").get(
            "tokenizer_class"
        )
    except LoadError:
        return set()
    if not isinstance(class_name, str) or not class_name.isidentifier():
        return set()
    import transformers

    names: set[str] = set()
    for candidate in (class_name, class_name.removesuffix("Fast")):
        try:  # a lazy import, or a placeholder class that raises when its backend is missing
            files = getattr(getattr(transformers, candidate, None), "vocab_files_names", None)
        except Exception:  # noqa: BLE001 - then this class adds no names
            continue
        if isinstance(files, dict):
            names |= {file for file in files.values() if _plain_name(file)}
    return names


def _plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and not {"/", "\\", "\x00"} & set(name)
    )


def _copy_new(source: Path, target: Path) -> None:
    """Copy a regular file to a path that must not exist yet, checking the descriptor it reads from (so a
    file swapped for a FIFO after a check is not waited on) and copying at most ``MAX_TOKENIZER_BYTES``."""
    descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as reader:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError(f"{source} is not a regular file")
        if info.st_size > MAX_TOKENIZER_BYTES:
            raise LoadError(
                f"{source} is {info.st_size:,} bytes, over {MAX_TOKENIZER_BYTES:,} for a tokenizer file"
            )
        with open(target, "xb") as writer:
            copied = 0
            while chunk := reader.read(min(1 << 20, MAX_TOKENIZER_BYTES + 1 - copied)):
                copied += len(chunk)
                if copied > MAX_TOKENIZER_BYTES:
                    raise LoadError(f"{source} grew past {MAX_TOKENIZER_BYTES:,} bytes while being copied")
                writer.write(chunk)
