"""Saving and loading converted models without pickles.

A saved model is a directory::

    mixcompile.json      manifest: mixcompile version, the recipes applied, how to rebuild the base model
    model.safetensors    every weight of the converted model
    config.json          (Hugging Face bases only) the base config, so the folder reads as an HF model folder

Loading rebuilds the base model, re-applies the recipes in order (conversion is deterministic in structure)
and loads the weights. Directories are written to a temporary sibling and renamed, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .errors import ConfigError, MixcompileError

MANIFEST = "mixcompile.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
BUILTIN_IMPORT_PREFIX = "mixcompile."

Base = nn.Module | Callable[[], nn.Module]


class LoadError(MixcompileError):
    """A path that cannot be read as a model: the message says which file and why."""


def save(
    model: nn.Module, path: str | os.PathLike, *, base: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write a converted ``model`` to the directory ``path`` (refused if it exists, unless ``overwrite``).

    ``base`` says how to rebuild the unconverted model; by default it is taken from what ``convert`` or
    ``load`` recorded, or from the model's Hugging Face config.
    """
    from .compiler import recipes_of

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}.")
    recipes = recipes_of(model)
    if not recipes:
        raise ConfigError(
            "this model was not converted by mixcompile (no recipe recorded); convert it first."
        )
    manifest = {
        "format": "mixcompile",
        "format_version": FORMAT_VERSION,
        "mixcompile_version": _version(),
        "recipes": [recipe.to_dict() for recipe in recipes],
        "base": base or base_spec_of(model),
        "weights": WEIGHTS,
    }
    with atomic_directory(Path(path), overwrite=overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        if manifest["base"]["kind"] == "transformers":
            model.config.to_json_file(str(tmp / "config.json"))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(path)


def load(
    path: str | os.PathLike, *, base: Base | None = None, trust_pickle: bool = False, trust_code: bool = False
) -> nn.Module:
    """Rebuild a model written by :func:`save`; its outputs equal the saved model's.

    ``base``: the unconverted model (a module, converted in place, or a function building one). Without
    it the manifest's recipe for the base is used: a Hugging Face config, an importable builder
    (``trust_code`` unless it is one of mixcompile's own), or a pickled module (``trust_pickle``).
    """
    from .compiler import Recipe, convert

    directory = Path(path)
    manifest = read_manifest(directory)
    model = _build_base(manifest["base"], base, trust_pickle=trust_pickle, trust_code=trust_code)
    for recipe in manifest["recipes"]:
        model = convert(model, Recipe.from_dict(recipe), inplace=True, verify=False)
    model.mixcompile_base = manifest["base"]
    weights = directory / manifest.get("weights", WEIGHTS)
    load_weights(model, weights)
    return model


def read_manifest(directory: Path) -> dict[str, Any]:
    file = directory / MANIFEST
    if not file.is_file():
        raise LoadError(f"{directory} is not a mixcompile directory: {MANIFEST} is missing.")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{file} is not valid JSON ({exc}); the directory is damaged.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "mixcompile":
        raise LoadError(f"{file} is not a mixcompile manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LoadError(
            f"{file} has format_version {manifest.get('format_version')!r}; this mixcompile "
            f"reads version {FORMAT_VERSION}. Upgrade mixcompile."
        )
    if not isinstance(manifest.get("base"), dict):
        raise LoadError(f"{file} has no 'base' section.")
    recipes = manifest.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, dict) for r in recipes):
        raise LoadError(f"{file} has no 'recipes' section (a list of the recipes applied, oldest first).")
    return manifest


def load_weights(model: nn.Module, file: Path) -> None:
    """Load safetensors weights strictly; corrupt, truncated or mismatched files get a one-line error."""
    if not file.is_file():
        raise LoadError(f"{file} is missing.")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{file} is corrupt or truncated: {exc}") from exc
    except RuntimeError as exc:
        raise LoadError(f"{file} does not fit the rebuilt model: {_first_line(exc)}") from exc
    if missing or unexpected:
        raise LoadError(
            f"{file} does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it saved by another recipe or base?)."
        )


def base_spec_of(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``'s base: what ``load``/``convert`` recorded, else its HF config."""
    recorded = getattr(model, "mixcompile_base", None)
    if isinstance(recorded, dict):
        return recorded
    config = getattr(model, "config", None)
    if (
        config is not None
        and hasattr(config, "to_dict")
        and type(model).__module__.startswith("transformers.")
    ):
        return {"kind": "transformers", "class": type(model).__name__, "config": config.to_dict()}
    return {"kind": "external"}


def _build_base(
    spec: dict[str, Any], base: Base | None, *, trust_pickle: bool, trust_code: bool
) -> nn.Module:
    if base is not None:
        model = base() if callable(base) and not isinstance(base, nn.Module) else base
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"base must be an nn.Module or a function returning one, got {type(model).__name__}."
            )
        return model
    kind = spec.get("kind")
    if kind == "transformers":
        return build_transformers(spec)
    if kind == "import":
        return build_imported(spec, trust_code=trust_code)
    if kind == "pickle":
        return read_pickled_base(spec, trust_pickle=trust_pickle)
    raise LoadError(
        "the manifest does not say how to rebuild the base model (it was converted from a model built in "
        "Python); pass it: mixcompile.load(path, base=build_my_model)."
    )


def build_transformers(spec: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    cls = getattr(transformers, str(spec.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LoadError(f"transformers has no model class {spec.get('class')!r}; is transformers up to date?")
    return cls(cls.config_class.from_dict(dict(spec.get("config") or {})))


def build_imported(spec: dict[str, Any], *, trust_code: bool) -> nn.Module:
    target = str(spec.get("target", ""))
    if not target.startswith(BUILTIN_IMPORT_PREFIX) and not trust_code:
        raise LoadError(
            f"rebuilding the base calls {target!r}, which runs code; pass trust_code=True "
            "(CLI: --trust-code) if you trust this directory."
        )
    module_name, _, attr = target.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LoadError(f"cannot import the base builder {target!r}: {exc}") from exc
    model = builder(**dict(spec.get("kwargs") or {}))
    if not isinstance(model, nn.Module):
        raise LoadError(f"the base builder {target!r} returned {type(model).__name__}, not an nn.Module.")
    return model


def read_pickled_base(spec: dict[str, Any], *, trust_pickle: bool) -> nn.Module:
    file = Path(str(spec.get("path", "")))
    if not file.is_file():
        raise LoadError(f"the base model was a pickled module at {file}, which is gone; pass base=.")
    if spec.get("sha256") and sha256(file) != spec["sha256"]:
        raise LoadError(f"the base model file {file} changed since conversion; pass base=.")
    return read_pickle(file, trust_pickle=trust_pickle)


def read_pickle(file: Path, *, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise LoadError(
            f"{file} is a pickle: unpickling runs code from the file. Refused; pass "
            "--trust-pickle (trust_pickle=True) only if you trust where it came from."
        )
    try:
        obj = torch.load(file, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{file} cannot be unpickled: {_first_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise LoadError(
            f"{file} holds a {type(obj).__name__}, not a full nn.Module (a state_dict has no "
            "architecture to convert; save the module itself, or use save_pretrained)."
        )
    return obj


def read_transformers_dir(directory: Path) -> nn.Module:
    """A Hugging Face model folder (config.json + weights), read offline."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise LoadError(
            f"{directory / 'config.json'} is not a readable Hugging Face config: {_first_line(exc)}"
        ) from exc
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if cls is None:
        raise LoadError(f"transformers has no model class {names[0]!r} (from config.json).")
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise LoadError(f"{directory} could not be loaded by transformers: {_first_line(exc)}") from exc


@contextlib.contextmanager
def atomic_directory(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` and move it into place only if the body succeeds."""
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; choose another path or allow overwriting (overwrite=True; CLI: --force)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise LoadError(
            "this is a Hugging Face model; install transformers (pip install transformers)."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _version() -> str:
    from . import __version__

    return __version__
