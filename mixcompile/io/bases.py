"""Rebuilding a saved model's base (the unconverted model), and what may run while doing so.

A base spec, as ``mixcompile.json`` stores it under ``"base"``:

- ``{"kind": "builder", "name": NAME, "kwargs": {...}}``: a builder that an installed plugin registered
  (``register_builders`` hook; ``mixcompile plugins`` lists them). Runs without a trust flag: only
  registered code, called with JSON scalars that must fit its signature and that it validates itself.
- ``{"kind": "transformers", "class": NAME, "config": {...}}``: a model class that transformers ships, built
  from the config. Config entries that make transformers load code (``auto_map``, a quantization backend,
  an attention kernel from the Hub) need ``trust_code``.
- ``{"kind": "pickle", "file": "base.pt", "sha256": HEX}``: the pickled module, stored in the directory;
  unpickling runs code, so it needs ``trust_pickle``.
- ``{"kind": "import", "target": "module:function", "kwargs": {...}}``: any importable function; needs
  ``trust_code``.
- ``{"kind": "external"}``: the model was built in Python; pass ``base=`` to load it.

In memory (``model.mixcompile_base``) a pickle spec holds the absolute ``path`` of its file instead of
``file``; :func:`stored_spec` copies that file into the directory being written.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixcompile.errors import LoadError, MixcompileError, UnknownNameError, first_line
from mixcompile.io.files import check_regular_file, confined_file
from mixcompile.plugins.build import build_plugin
from mixcompile.plugins.hookspecs import ENTRY_POINT_GROUP as GROUP
from mixcompile.plugins.manager import ENV_VAR
from mixcompile.plugins.providers import provider_words

PICKLED_BASE = "base.pt"
KINDS = ("builder", "transformers", "pickle", "import", "external")
# Directories written before builders were registered name the demo model's builder by import path.
LEGACY_TARGETS = {"mixcompile.toy:build_tiny_gpt": "tiny_gpt"}
# Config entries that make transformers import or download code.
CODE_KEYS = ("auto_map", "quantization_config", "trust_remote_code", "custom_pipelines")
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
MAX_LAYERS = 4096  # a config asking for more layers than this is not a model anyone saved
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


def check_base_spec(spec: dict[str, Any], directory: Path, *, where: str) -> dict[str, Any]:
    """Type-check a stored base spec; returns its in-memory form (pickle file resolved in ``directory``)."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise LoadError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}.")
    allowed = {
        "builder": {"kind", "name", "kwargs"},
        "transformers": {"kind", "class", "config"},
        "pickle": {"kind", "file", "sha256"},
        "import": {"kind", "target", "kwargs"},
        "external": {"kind"},
    }[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        hint = " (a pickled base is stored in the directory, never named by path)" if "path" in extra else ""
        raise LoadError(f"{where}: unexpected fields {extra} for kind {kind!r}{hint}.")
    if kind == "builder":
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise LoadError(f"{where}: 'name' must be the name of a registered builder.")
        _check_kwargs(spec.get("kwargs", {}), f"{where}: kwargs")
    elif kind == "import":
        target = spec.get("target")
        if not isinstance(target, str) or not _TARGET.match(target):
            raise LoadError(f"{where}: 'target' must look like 'package.module:function', got {target!r}.")
        _check_kwargs(spec.get("kwargs", {}), f"{where}: kwargs")
    elif kind == "transformers":
        if not isinstance(spec.get("class"), str) or not _IDENTIFIER.match(spec["class"]):
            raise LoadError(
                f"{where}: 'class' must be a transformers model class name, got {spec.get('class')!r}."
            )
        if not isinstance(spec.get("config"), dict):
            raise LoadError(f"{where}: 'config' must be an object (the model's config).")
    elif kind == "pickle":
        digest = spec.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise LoadError(f"{where}: 'sha256' must be 64 hex digits.")
        file = confined_file(directory, spec.get("file"), f"{where}: 'file'")
        return {"kind": "pickle", "path": str(file.resolve()), "sha256": digest}
    return dict(spec)


def stored_spec(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The form of ``spec`` written into ``directory`` (a pickled base is copied in beside the weights)."""
    if spec.get("kind") != "pickle":
        # an earlier mc.load kept the builder's package here, in memory (a pickled model still has it)
        return {key: value for key, value in spec.items() if key != "provided_by"}
    source = Path(spec["path"])
    check_regular_file(source, "pickled base model")
    if sha256(source) != spec["sha256"]:
        raise MixcompileError(f"the base model file {source} changed since it was read; convert again.")
    shutil.copyfile(source, directory / PICKLED_BASE)
    return {"kind": "pickle", "file": PICKLED_BASE, "sha256": spec["sha256"]}


def build_base(
    spec: dict[str, Any],
    *,
    trust_pickle: bool,
    trust_code: bool,
    meta: bool = False,
    provider: Mapping[str, str] | None = None,
) -> nn.Module | None:
    """The base model ``spec`` describes. ``meta=True`` builds a skeleton (parameters on the meta device,
    see :func:`parameters_on_meta`), or gives ``None`` for kinds that cannot be built so (a pickle, a model
    built in Python). ``provider``: see :func:`call_builder`."""
    kind = spec["kind"]
    if kind == "builder":
        return _on_device(meta, lambda: call_builder(spec["name"], spec.get("kwargs", {}), provider=provider))
    if kind == "import":
        name = LEGACY_TARGETS.get(spec["target"])
        if name is not None:
            return _on_device(meta, lambda: call_builder(name, spec.get("kwargs", {})))
        if not trust_code:
            raise LoadError(
                f"rebuilding the base calls {spec['target']!r}, which runs code; pass trust_code=True "
                "(CLI: --trust-code) only if you trust this directory."
            )
        return _on_device(meta, lambda: _call_imported(spec["target"], spec.get("kwargs", {})))
    if kind == "transformers":
        return _on_device(
            meta, lambda: build_transformers(spec["class"], spec["config"], trust_code, saved_dtype=not meta)
        )
    if kind == "pickle":
        return None if meta else read_pickled_base(Path(spec["path"]), spec["sha256"], trust_pickle)
    if meta:
        return None
    raise LoadError(
        "the manifest does not say how to rebuild the base model (it was converted from a model built in "
        "Python); pass it: mixcompile.load(path, base=build_my_model)."
    )


def call_builder(
    name: str, kwargs: dict[str, Any], *, provider: Mapping[str, str] | None = None
) -> nn.Module:
    """The base model the registered builder ``name`` builds; ``provider`` is the package that provided it
    when the model was saved, named should it be missing."""
    try:
        model: nn.Module = build_plugin("builder", name, options=kwargs, expected=nn.Module)
    except UnknownNameError as exc:
        if (exc.kind, exc.name) != ("builder", name):  # an option's value the builder does not know
            raise LoadError(f"the base model could not be rebuilt: {exc}") from None
        known = ", ".join(repr(k) for k in exc.known) or "none"
        raise LoadError(
            f"the base builder {name!r} is not registered here (known: {known}). {install_hint(provider)}"
        ) from None
    except MixcompileError as exc:
        raise LoadError(f"the base model could not be rebuilt: {exc}") from None
    return model


def install_hint(recorded: Mapping[str, str] | None) -> str:
    """What to do about a plugin a saved model needs and no loaded one registers, ``recorded`` being the
    package that provided it when the model was saved (see :mod:`mixcompile.plugins.providers`), if known.
    Where that package is installed, installing it again would not help: say what else leaves it out."""
    listing = "`mixcompile plugins` lists what is loaded"
    if not recorded or "package" not in recorded:
        return f"If a plugin package provides it, install it ({listing}; {ENV_VAR} may be leaving it out)."
    said = f"It was provided by {provider_words(recorded)} when the model was saved"
    try:
        here = importlib.metadata.version(recorded["package"])
    except importlib.metadata.PackageNotFoundError:
        return f"{said}: install that ({listing}; {ENV_VAR} may be leaving it out)."
    chosen = os.environ.get(ENV_VAR, "").strip()
    selected = {name.strip() for name in chosen.split(",")}
    declared = importlib.metadata.distribution(recorded["package"]).entry_points
    entry_points = {ep.name for ep in declared if ep.group == GROUP}
    if chosen and chosen.lower() != "all" and not entry_points & selected:
        why = f"{ENV_VAR}={chosen!r} leaves its entry point out"
    else:
        why = (
            "it may register the plugin only in-process, when one of its modules is imported (import it "
            "before loading), or this version no longer has it"
        )
    return f"{said}; version {here} of it is installed here but does not register it: {why} ({listing})."


def build_transformers(
    class_name: str, config: dict[str, Any], trust_code: bool, *, saved_dtype: bool = False
) -> nn.Module:
    """``class_name`` built from ``config``; ``saved_dtype`` builds it in the config's ``dtype``, as
    ``from_pretrained`` does (a model built for real, as ``bench`` times it, in the dtype it was saved in;
    skeletons get their dtypes from the weights)."""
    transformers = transformers_module()
    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LoadError(f"transformers has no model class {class_name!r}; is transformers up to date?")
    check_transformers_config(config, trust_code=trust_code, where=f"the config of {class_name}")
    model_class: Any = cls  # a PreTrainedModel subclass; transformers is imported lazily, so untyped here
    try:
        model_config = model_class.config_class.from_dict(dict(config))
        from_config = getattr(model_class, "_from_config", None)  # honours config.dtype (transformers' own)
        model: nn.Module = (
            from_config(model_config) if saved_dtype and from_config else model_class(model_config)
        )
        return model
    except Exception as exc:  # noqa: BLE001 - a hostile config can make transformers raise anything
        raise LoadError(
            f"transformers cannot build {class_name} from the saved config: {first_line(exc)}"
        ) from None


def check_transformers_config(config: dict[str, Any], *, trust_code: bool, where: str) -> None:
    """Refuse config entries that load code (without ``trust_code``) and absurd layer counts, anywhere in
    the config (sub-configs of encoder-decoder and multimodal models included)."""
    for path, key, value in _walk(config):
        name = f"{where}: {'.'.join([*path, key])}"
        if key in CODE_KEYS and value not in (None, {}, False) and not trust_code:
            raise LoadError(f"{name} makes transformers load code; pass trust_code=True (CLI: --trust-code).")
        hub_kernel = key in ATTENTION_KEYS and isinstance(value, str) and not _IDENTIFIER.match(value)
        if hub_kernel and not trust_code:
            raise LoadError(
                f"{name} = {value!r} loads an attention kernel from the Hub (code); pass trust_code=True "
                "(CLI: --trust-code) or remove it."
            )
        if "layer" in key.lower() and isinstance(value, int) and not 0 <= value <= MAX_LAYERS:
            raise LoadError(f"{name} = {value} is not a sane layer count (0..{MAX_LAYERS}).")


def read_pickled_base(file: Path, digest: str | None, trust_pickle: bool) -> nn.Module:
    check_regular_file(file, "pickled base model")
    if digest is not None and sha256(file) != digest:
        raise LoadError(f"the base model file {file} does not match the sha256 the manifest records.")
    return read_pickle(file, trust_pickle=trust_pickle)


def read_pickle(file: Path, *, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise LoadError(
            f"{file} is a pickle: unpickling runs code from the file. Refused; pass "
            "--trust-pickle (trust_pickle=True) only if you trust where it came from."
        )
    check_regular_file(file, "pickled model")
    try:
        obj = torch.load(file, weights_only=False, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
        raise LoadError(f"{file} cannot be unpickled: {first_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise LoadError(
            f"{file} holds a {type(obj).__name__}, not a full nn.Module (a state_dict has no "
            "architecture to convert; save the module itself, or use save_pretrained)."
        )
    return obj


def base_spec_of(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``'s base: what a builder or ``load`` recorded, else its HF config."""
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


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: the structure, no memory."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    return copy.deepcopy(model, memo)


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def transformers_module() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise LoadError(
            "this is a Hugging Face model; install transformers (pip install transformers)."
        ) from exc


def _call_imported(target: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = target.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LoadError(f"cannot import the base builder {target!r}: {exc}") from exc
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:  # the manifest's kwargs, not the builder's code
        raise LoadError(f"the base builder {target!r} does not take the kwargs {kwargs}: {exc}.") from None
    except ValueError:  # no signature to check (a builtin): the call says
        pass
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise LoadError(f"the base builder {target!r} returned {type(model).__name__}, not an nn.Module.")
    return model


def _on_device(meta: bool, build: Callable[[], nn.Module]) -> nn.Module:
    if not meta:
        return build()
    with parameters_on_meta():
        return build()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in the body keep their parameters on the meta device (no memory, no init) and their
    buffers real: a skeleton that loading fills by assignment, with the buffers a checkpoint does not hold
    (rotary frequencies, position ids) computed as the model computes them."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _check_kwargs(kwargs: object, where: str) -> None:
    if not isinstance(kwargs, dict):
        raise LoadError(f"{where} must be an object of argument names to values.")
    for key, value in kwargs.items():
        if not _IDENTIFIER.match(key):
            raise LoadError(f"{where}: {key!r} is not an argument name.")
        if value is not None and not isinstance(value, bool | int | float | str):
            raise LoadError(
                f"{where}: {key} must be a number, string, boolean or null, got a {type(value).__name__}."
            )


def _walk(config: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    for key, value in config.items():
        yield path, str(key), value
        if isinstance(value, dict):
            yield from _walk(value, (*path, str(key)))
