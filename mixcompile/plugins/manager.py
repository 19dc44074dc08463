"""Plugin loading and name lookup.

One ``pluggy.PluginManager("mixcompile")`` holds the built-in plugins (always) and the third-party ones
found in the ``mixcompile`` entry-point group. ``MIXCOMPILE_PLUGINS`` restricts which third-party entry
points load: unset or ``all`` loads all, ``none`` loads none, ``a,b`` loads only those.

The registry is built lazily by calling each plugin's hooks one at a time, so a plugin that raises or
registers something malformed is named in the error instead of hiding behind pluggy's traceback.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType, ModuleType
from typing import cast

import pluggy

from mixcompile.errors import PluginError, UnknownNameError
from mixcompile.plugins import hookspecs
from mixcompile.types import PluginKind

ENV_VAR = "MIXCOMPILE_PLUGINS"
KINDS: dict[PluginKind, str] = {
    "router": "register_routers",
    "mixer": "register_mixers",
    "kernel": "register_kernels",
    "initializer": "register_initializers",
    "pattern": "register_patterns",
    "builder": "register_builders",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MARKER = f"{hookspecs.PROJECT}_impl"  # what @hookimpl sets on a function


@dataclass(frozen=True)
class Registration:
    kind: PluginKind
    name: str
    factory: Callable[..., object]
    plugin: str
    description: str = ""

    @property
    def builtin(self) -> bool:
        """Registered by mixcompile's own plugins (``mixcompile_plugins``), whose results the blocks may
        take as correct by construction where a third party's are checked."""
        import mixcompile_plugins

        return self.plugin in {module.__name__ for module in mixcompile_plugins.BUILTIN_PLUGINS}


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._entries: dict[PluginKind, dict[str, Registration]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._collect(kind, hook_name, impl)

    def _collect(self, kind: PluginKind, hook_name: str, impl: pluggy.HookImpl) -> None:
        plugin = impl.plugin_name

        def register(name: str, factory: Callable[..., object], *, description: str = "") -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(
                    f"{_plugin_words(plugin)} registered a {kind} with an invalid name {name!r}: "
                    f"use letters, digits, '_', '-' or '.'.{_way_out(plugin)}"
                )
            if name == "auto":
                raise PluginError(
                    f"{_plugin_words(plugin)} registered a {kind} named 'auto', which is reserved."
                    f"{_way_out(plugin)}"
                )
            if not callable(factory):
                raise PluginError(
                    f"{_plugin_words(plugin)} registered {kind} {name!r} with a non-callable factory "
                    f"{factory!r}; pass a class or function.{_way_out(plugin)}"
                )
            existing = self._entries[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"{_plugin_words(plugin)} registered {kind} {name!r}, which "
                    f"{_plugin_words(existing.plugin)} already registered: rename one of them."
                    f"{_way_out(plugin)}"
                )
            self._entries[kind][name] = Registration(kind, name, factory, plugin, str(description))

        _in_hook.running = (plugin, hook_name)
        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{_plugin_words(plugin)} raised in hook {hook_name}: {type(exc).__name__}: "
                f"{exception_text(exc)}.{_way_out(plugin)}"
            ) from exc
        finally:
            _in_hook.running = None

    def get(self, kind: PluginKind, name: str) -> Registration:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownNameError(kind, str(name), self._entries[kind]) from None

    def names(self, kind: PluginKind) -> list[str]:
        return sorted(self._entries[kind])

    def all(self) -> list[Registration]:
        return [reg for kind in KINDS for reg in sorted(self._entries[kind].values(), key=lambda r: r.name)]


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_importing: str | None = None  # the entry point whose module is being imported, while entry points load
# The selected entry points, by plugin name: errors name the package a user must fix, uninstall or leave out.
_entry_points: dict[str, importlib.metadata.EntryPoint] = {}


class _InHook(threading.local):
    """The plugin and hook this thread is running while it builds a registry (per thread: another thread
    looking the registry up meanwhile is not inside a hook)."""

    running: tuple[str, str] | None = None


_in_hook = _InHook()


def exception_text(exc: BaseException) -> str:
    """An exception's message for the middle of a sentence: without its closing full stop."""
    text = str(exc).rstrip()
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and selected entry points loaded."""
    global _pm
    if _pm is None:
        if _importing is not None:
            raise PluginError(
                f"the module of entry point {_importing} used mixcompile's plugins while being imported "
                "(mixcompile.register_plugin, a registry look-up or a block built at import time), before "
                "they were loaded. mixcompile registers what an entry point names itself: leave "
                "register_plugin out of that module, and move other such code out of import time."
            )
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _register_builtins(pm)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def registry() -> Registry:
    """Every router, mixer, kernel, initializer, pattern and builder the loaded plugins register."""
    global _registry
    _refuse_inside_a_hook("looked the registry up (mixcompile.registry(), a look-up, a block built)")
    if _registry is None:
        _registry = Registry(plugin_manager())
    return _registry


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (module or instance with hook implementations) in this process; returns
    its name. Everything it registers is checked at once (names, factories, clashes with the plugins
    already there): a plugin that is refused leaves the registry as it was."""
    global _registry
    _refuse_inside_a_hook("called mixcompile.register_plugin")
    pm = plugin_manager()
    registered = _checked_register(pm, plugin, name)
    try:
        fresh = Registry(pm)
    except PluginError:
        pm.unregister(name=registered)
        raise
    _registry = fresh
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered in this process (by :func:`register_plugin`'s returned name)."""
    global _registry
    pm = plugin_manager()
    if pm.get_plugin(name) is None:
        raise PluginError(f"no plugin named {name!r} is registered; known: {sorted(_plugin_names(pm))}.")
    pm.unregister(name=name)
    _entry_points.pop(name, None)  # a plugin registered under its name later is another one
    _registry = None


def reset() -> None:
    """Forget loaded plugins; the next lookup reloads them (and re-reads ``MIXCOMPILE_PLUGINS``)."""
    global _pm, _registry
    _pm = None
    _registry = None


def lookup(kind: PluginKind, name: str) -> Registration:
    return registry().get(kind, name)


def _refuse_inside_a_hook(what: str) -> None:
    """A hook runs while the registry is being built: looking the registry up from it would build it again,
    from inside itself, without end (a bare RecursionError)."""
    if _in_hook.running is not None:
        plugin, hook_name = _in_hook.running
        raise PluginError(
            f"{_plugin_words(plugin)} {what} inside its hook {hook_name}: hooks run while the registry is "
            "being built, so the other plugins are not there to find yet. Look them up when the registered "
            "factory is called, not while registering it."
        )


def _plugin_names(pm: pluggy.PluginManager) -> list[str]:
    return [n for n, _ in pm.list_name_plugin()]


def _register_builtins(pm: pluggy.PluginManager) -> None:
    import mixcompile_plugins

    for module in mixcompile_plugins.BUILTIN_PLUGINS:
        _checked_register(pm, module, module.__name__)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    global _importing, _entry_points
    selection = os.environ.get(ENV_VAR, "all").strip()
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    if selection.lower() == "all":
        wanted = list(found)
    elif selection.lower() in ("none", ""):
        wanted = []
    else:
        wanted = list(dict.fromkeys(part.strip() for part in selection.split(",") if part.strip()))
        for name in wanted:
            if name not in found:
                raise UnknownNameError(f"entry point (in {ENV_VAR})", name, found)
    _entry_points = {name: found[name][0] for name in wanted}
    for name in wanted:
        if len(found[name]) > 1:
            listing = " and ".join(_describe_entry_point(ep) for ep in found[name])
            raise PluginError(
                f"{len(found[name])} installed distributions declare a mixcompile entry point named "
                f"{name!r}: {listing}. An entry point's name is its plugin's name, so only one of them could "
                "load. Uninstall one, or ask its author to rename the entry point (in the "
                f"[project.entry-points.mixcompile] table); {ENV_VAR} without {name!r} loads neither."
            )
        ep = found[name][0]
        if pm.get_plugin(name) is not None:
            raise PluginError(
                f"entry point {_describe_entry_point(ep)} has the name of plugin {name!r}, which is already "
                "registered (built-ins are registered first): an entry point's name is its plugin's name, so "
                "it cannot load. Ask its author to rename the entry point (in the "
                f"[project.entry-points.mixcompile] table), or leave it out with {ENV_VAR}."
            )
        _importing = _describe_entry_point(ep)
        who = f"plugin {name!r} (entry point {ep.value!r} of {_package(ep)})"
        try:
            module: ModuleType | object = ep.load()
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{who} failed to import: {type(exc).__name__}: {exception_text(exc)}.{_way_out(name)}"
            ) from exc
        finally:
            _importing = None
        if isinstance(module, type) and _has_hook_methods(module):
            raise PluginError(
                f"{who} names class {module.__qualname__}, whose hooks are methods: they need an instance. "
                f"Point the entry point at one: add 'PLUGIN = {module.__qualname__}()' to module "
                f'{module.__module__} and declare {name} = "{module.__module__}:PLUGIN".{_way_out(name)}'
            )
        classes = _classes_with_hooks(module)
        if classes:
            raise PluginError(
                f"{who} implements no mixcompile hook itself: its hooks are methods of class {classes[0]}. "
                f"Point the entry point at an instance: add 'PLUGIN = {classes[0]}()' to the module and "
                f'declare {name} = "{ep.value}:PLUGIN".{_way_out(name)}'
            )
        _checked_register(pm, module, name)


def _describe_entry_point(ep: importlib.metadata.EntryPoint) -> str:
    """``'name' = 'module:attr' (package 'dist' 1.0)``, for errors."""
    return f"{ep.name!r} = {ep.value!r} ({_package(ep)})"


def _package(ep: importlib.metadata.EntryPoint) -> str:
    """``package 'dist' 1.0``: the installed distribution declaring ``ep``, which a user can uninstall."""
    dist = getattr(ep, "dist", None)
    return f"package {dist.name!r} {dist.version}" if dist is not None else "an unnamed package"


def entry_point_of(name: str) -> importlib.metadata.EntryPoint | None:
    """The installed entry point that loaded plugin ``name``, if one did (not one left out by
    ``MIXCOMPILE_PLUGINS``, nor a plugin registered in-process under its name)."""
    return _entry_points.get(name)


def _plugin_words(name: str) -> str:
    """``plugin 'acme' (package 'acme-moe-tools' 0.1)``, the package where an entry point loaded it: the
    entry point's name alone does not say what to fix or uninstall."""
    ep = _entry_points.get(name)
    return f"plugin {name!r}" + (f" ({_package(ep)})" if ep is not None else "")


def _way_out(name: str) -> str:
    """For a broken installed plugin, what its user can do until its author fixes it: uninstall its package,
    or leave it out (``MIXCOMPILE_PLUGINS`` set to the other selected entry points). "" for a plugin
    registered in-process, which its caller fixes."""
    ep = _entry_points.get(name)
    if ep is None:
        return ""
    others = ",".join(other for other in _entry_points if other != name) or "none"
    return f" Until it is fixed, uninstall {_package(ep)}, or leave it out with {ENV_VAR}={others}."


def _has_hook_methods(cls: type) -> bool:
    """Whether ``cls`` defines hooks as (plain) methods, which only an instance of it can call."""
    methods = (inspect.getattr_static(cls, hook, None) for hook in KINDS.values())
    return any(isinstance(method, FunctionType) and hasattr(method, _MARKER) for method in methods)


def _classes_with_hooks(module: object) -> list[str]:
    """The classes a module without module-level hooks defines with hook methods: an entry point naming
    the module (not an instance of one of them) registers nothing."""
    if not isinstance(module, ModuleType) or any(hasattr(value, _MARKER) for value in vars(module).values()):
        return []
    return [
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and value.__module__ == module.__name__ and _has_hook_methods(value)
    ]


def _misspelt_hook(plugin: object) -> str:
    """`` Did you mean 'register_routers' (not 'register_router')?`` for a hook of ``plugin`` that no hook
    spec has, where one is close; else ""."""
    for attr in dir(plugin):
        if attr not in KINDS.values() and hasattr(getattr(plugin, attr, None), _MARKER):
            close = difflib.get_close_matches(attr, KINDS.values(), n=1)
            if close:
                return f" Did you mean {close[0]!r} (not {attr!r})?"
    return ""


def _checked_register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str:
    """Register and validate at once, so a misspelt hook or argument names its plugin."""
    label = name or cast(str, getattr(plugin, "__name__", repr(plugin)))  # a module's or class's name
    if name is not None and not isinstance(name, str):
        raise PluginError(f"a plugin's name must be a string, got {name!r}.")
    holder = pm.get_plugin(label)
    if holder is not None:
        same = " (this plugin)" if holder is plugin else ""
        raise PluginError(
            f"a plugin named {label!r} is already registered{same}; unregister_plugin({label!r}) first, or "
            "register this one under another name."
        )
    if pm.get_name(plugin) is not None:
        raise PluginError(f"plugin {label!r} is already registered, as {pm.get_name(plugin)!r}.")
    hooks = ", ".join(KINDS.values())
    try:
        registered = pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.get_plugin(label) is plugin:
            pm.unregister(name=label)
        raise PluginError(
            f"{_plugin_words(label)} is malformed: {exception_text(exc)}.{_misspelt_hook(plugin)} Hooks are: "
            f"{hooks}, each taking one argument named 'register'.{_way_out(label)}"
        ) from exc
    registered = registered or label
    if not pm.get_hookcallers(plugin):
        pm.unregister(name=registered)
        raise PluginError(
            f"{_plugin_words(label)} implements no mixcompile hook: it needs at least one of {hooks} (marked "
            f"with @mixcompile.hookimpl), each taking one argument named 'register'.{_way_out(label)}"
        )
    return registered
