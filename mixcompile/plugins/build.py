"""The one way a registered plugin is built or called, and how its faults are reported.

Three kinds of fault are told apart, because each has a different fix:

- **wrong options**: a name the factory does not take (with the closest one suggested), or a value it
  refuses with ``ConfigError``: a :class:`~mixcompile.ConfigError` naming the plugin (fix the call);
- **a crash inside the plugin's own code**: a :class:`~mixcompile.PluginError` naming the plugin and the
  site (a bug to report to the plugin's author);
- **a malformed result**: a :class:`~mixcompile.PluginError` saying what was expected.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import torch
from torch.utils.checkpoint import _StopRecomputationError

from mixcompile.errors import ConfigError, MixcompileError, PluginError
from mixcompile.plugins.manager import exception_text, lookup
from mixcompile.types import PluginKind as PluginKind  # re-exported: blocks name their plugins' kinds

# How an error names a plugin: the text, or a function giving it, so a compiled forward never reads the
# per-block text (each block's own string would be a guard, and every block a recompile).
Source: TypeAlias = str | Callable[[], str]
T = TypeVar("T")

# Raised through plugin code on purpose, and caught by whoever called the block: running out of memory
# (batch-size finders catch it by type) and the signal non-reentrant activation checkpointing raises from
# a saved-tensor hook to stop a recomputation once it has what backward needs.
_NOT_PLUGIN_FAULTS = (torch.OutOfMemoryError, _StopRecomputationError)


@dataclass(frozen=True)
class FactoryCall:
    """How mixcompile calls the factory of one kind of plugin (see ``mixcompile/plugins/hookspecs.py``)."""

    signature: str  # as errors show it
    own: frozenset[str] = frozenset()  # keyword arguments mixcompile passes itself (not a user's options)
    options: bool = True  # whether a user (or a manifest) can pass options


FACTORY_CALLS: dict[PluginKind, FactoryCall] = {
    "router": FactoryCall("factory(d_model, num_experts, top_k, **options)"),
    "mixer": FactoryCall("factory(d_model, num_experts, group_size, **options)"),
    "kernel": FactoryCall("factory()", options=False),
    "initializer": FactoryCall("factory(experts, dense, *, generator, **options)", frozenset({"generator"})),
    "pattern": FactoryCall("factory()", options=False),
    "builder": FactoryCall("factory(**kwargs)"),
}


def source_text(source: Source) -> str:
    return source if isinstance(source, str) else source()


def plugin_source(kind: str, name: str, plugin: str, where: str = "") -> str:
    """How errors name a plugin: ``router 'topk' (plugin 'mixcompile_plugins.routers') at model.mlp``."""
    return f"{kind} {name!r} (plugin {plugin!r})" + (f" at {where}" if where else "")


def build_plugin(
    kind: PluginKind,
    name: str,
    *args: Any,
    options: Mapping[str, Any] | None = None,
    expected: type | tuple[type, ...] | None = None,
    where: str = "",
) -> Any:
    """Build the plugin registered as ``name``: ``factory(*args, **options)``, checked to be an instance of
    ``expected`` (of every type of a tuple: a protocol and ``nn.Module``, say); errors name it, its plugin and
    ``where`` it is built (a site)."""
    source = describe_plugin(kind, name, where)
    built = call_factory(lookup(kind, name).factory, source, args, dict(options or {}), kind=kind)
    kinds = expected if isinstance(expected, tuple) else () if expected is None else (expected,)
    try:  # a protocol's isinstance reads every attribute it declares: a property may raise
        conforms = all(isinstance(built, kind) for kind in kinds)
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises is reported as its bug
        raise _crash(source, "when its attributes were read", exc) from exc
    if not conforms:
        wanted = " and a ".join(_public_name(kind) for kind in kinds)
        missing = [name for kind in kinds if not isinstance(built, kind) for name in _members(kind, built)]
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        raise PluginError(f"{source} built a {type(built).__name__}, expected a {wanted}{lacks}.")
    return built


def _members(protocol: type, built: object) -> list[str]:
    """The attributes and methods a protocol declares that ``built`` does not have."""
    if not getattr(protocol, "_is_protocol", False):
        return []
    declared = set(getattr(protocol, "__annotations__", {})) | {
        name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")
    }
    if "__call__" in vars(protocol):
        declared.add("__call__")
    return sorted(name for name in declared if not hasattr(built, name))


def describe_plugin(kind: PluginKind, name: str, where: str = "") -> str:
    """The name errors give the plugin registered as ``name`` (see :func:`plugin_source`)."""
    return plugin_source(kind, name, lookup(kind, name).plugin, where)


def call_factory(
    factory: Callable[..., T],
    source: str,
    args: tuple[Any, ...],
    options: dict[str, Any],
    *,
    kind: PluginKind,
) -> T:
    """``factory(*args, **options)`` with its faults told apart (see the module docstring).

    ``kind`` says how mixcompile calls such a factory: arguments it passes itself that do not bind are the
    plugin's bug (``PluginError``); options the user gave that do not bind are the user's
    (``ConfigError``)."""
    call = FACTORY_CALLS[kind]
    own = {name: value for name, value in options.items() if name in call.own}
    user = {name: value for name, value in options.items() if name not in own}
    _check_call(factory, source, kind, call, args, own)
    _check_options(factory, source, args, own, user)
    try:
        return factory(*args, **options)
    except ConfigError as exc:
        raise exc.prefixed(source) from exc
    except MixcompileError:
        raise
    except TypeError as exc:
        if any(f"argument '{name}'" in str(exc) for name in user):
            raise ConfigError(f"{source} rejected its options {user}: {exception_text(exc)}.") from exc
        raise _crash(source, "while being built", exc) from exc
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises is reported as its bug
        raise _crash(source, "while being built", exc) from exc


def call_plugin(source: Source, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a plugin's code at run time (a forward, a kernel); a crash inside it names the plugin.

    An exception costs nothing until raised, so this wraps every eager call. While ``torch.compile``
    traces, the call is made plainly: a graph break inside a ``try`` block would split the caller's graph.
    """
    if torch.compiler.is_compiling():
        return function(*args, **kwargs)
    return _call(source, "", function, args, kwargs)


def call_plugin_method(source: Source, when: str, function: Callable[..., T], *args: Any) -> T:
    """:func:`call_plugin` for a call made outside a forward (a kernel's ``supports``), whose crash says
    ``when`` it happened: ``kernel 'k' (plugin 'p') crashed in supports(): ...``."""
    return _call(source, when, function, args, {})


def _call(source: Source, when: str, function: Callable[..., T], args: tuple[Any, ...], kwargs: Any) -> T:
    try:
        return function(*args, **kwargs)
    except _NOT_PLUGIN_FAULTS:
        raise
    except MixcompileError as exc:
        text = source_text(source)
        if text in str(exc):
            raise
        raise exc.prefixed(f"{text} {when}".rstrip()) from exc
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises is reported as its bug
        raise _crash(source_text(source), when, exc) from exc


def accepted_options(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword names ``factory`` takes, following ``**kwargs`` up a class's ``__init__`` chain;
    ``None`` when it takes any name."""
    if isinstance(factory, type):
        callables = [vars(c)["__init__"] for c in factory.__mro__ if "__init__" in vars(c)]
    else:
        callables = [factory]
    names: set[str] = set()
    for function in callables:
        try:
            params = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def _check_call(
    factory: Callable[..., Any],
    source: str,
    kind: PluginKind,
    call: FactoryCall,
    args: tuple[Any, ...],
    own: dict[str, Any],
) -> None:
    """The arguments mixcompile passes itself must bind: when they do not, the factory's signature is wrong
    (the plugin's bug), whatever options the user gave."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the call itself will tell
    try:
        signature.bind(*args, **own) if not call.options else signature.bind_partial(*args, **own)
    except TypeError as exc:
        label = getattr(factory, "__qualname__", None) or repr(factory)
        signature = signature.replace(return_annotation=inspect.Signature.empty)
        raise PluginError(
            f"{source} has a factory mixcompile cannot call: {_article(kind)} {kind} is built as "
            f"{call.signature}, but {label}{signature} does not take that ({exc}). This is a bug in the "
            "plugin: its factory needs that signature; report it to its author."
        ) from None


def _check_options(
    factory: Callable[..., Any],
    source: str,
    args: tuple[Any, ...],
    own: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """The user's ``options`` (``own``: the keywords mixcompile passes itself, neither listed nor blamed)."""
    known = accepted_options(factory)
    if known is not None:
        known -= _filled_names(factory, len(args)) | set(own)
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                listing = ", ".join(sorted(known)) or "(none)"
                raise ConfigError(
                    f"{source} rejected its options: no option {name!r}.{hint} Its options: {listing}."
                )
    try:
        inspect.signature(factory).bind(*args, **own, **options)
    except TypeError as exc:
        raise ConfigError(f"{source} rejected its options {options}: {exc}.") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will tell


def _filled_names(factory: Callable[..., Any], count: int) -> set[str]:
    """The parameters the first ``count`` positional arguments fill, up a class's ``__init__`` chain (a
    subclass taking ``*args`` passes them on): not options, so not listed as such."""
    if not isinstance(factory, type):
        return set(_positional_names(factory)[:count])
    filled: set[str] = set()
    for init in (vars(c)["__init__"] for c in factory.__mro__ if "__init__" in vars(c)):
        filled |= set(_positional_names(init)[1 : count + 1])  # after self
        if not _passes_on_positionals(init):  # the chain ends where the arguments do
            break
    return filled


def _passes_on_positionals(function: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_POSITIONAL for p in params)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _public_name(kind: type) -> str:
    top = kind.__module__.split(".")[0]
    return f"{top}.nn.{kind.__name__}" if top == "torch" else f"{top}.{kind.__name__}"


def _positional_names(factory: Callable[..., Any]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _crash(source: str, when: str, exc: BaseException) -> PluginError:
    when = f" {when}" if when else ""
    return PluginError(
        f"{source} crashed{when}: {type(exc).__name__}: {exception_text(exc)}. This is a bug in the plugin; "
        "report it to its author (MIXCOMPILE_DEBUG=1 shows the traceback)."
    )
