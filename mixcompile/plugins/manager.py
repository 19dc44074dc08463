"""Plugin loading and name lookup.

One ``pluggy.PluginManager("mixcompile")`` holds the built-in plugins (always) and the third-party ones
found in the ``mixcompile`` entry-point group. ``MIXCOMPILE_PLUGINS`` restricts which third-party entry
points load: unset or ``all`` loads all, ``none`` loads none, ``a,b`` loads only those.

The registry is built lazily by calling each plugin's hooks one at a time, so a plugin that raises or
registers something malformed is named in the error instead of hiding behind pluggy's traceback.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
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


@dataclass(frozen=True)
class Registration:
    kind: PluginKind
    name: str
    factory: Callable[..., object]
    plugin: str
    description: str = ""


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
                    f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}: "
                    "use letters, digits, '_', '-' or '.'."
                )
            if name == "auto":
                raise PluginError(f"plugin {plugin!r} registered a {kind} named 'auto', which is reserved.")
            if not callable(factory):
                raise PluginError(
                    f"plugin {plugin!r} registered {kind} {name!r} with a non-callable factory "
                    f"{factory!r}; pass a class or function."
                )
            existing = self._entries[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"plugin {plugin!r} registered {kind} {name!r}, which plugin {existing.plugin!r} "
                    f"already registered; rename one of them or disable a plugin with {ENV_VAR}."
                )
            self._entries[kind][name] = Registration(kind, name, factory, plugin, str(description))

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin!r} raised in hook {hook_name}: {type(exc).__name__}: {exc}. "
                f"Fix the plugin, or leave it out with {ENV_VAR}."
            ) from exc

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


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and selected entry points loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _register_builtins(pm)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def registry() -> Registry:
    """Every router, mixer, kernel, initializer, pattern and builder the loaded plugins register."""
    global _registry
    if _registry is None:
        _registry = Registry(plugin_manager())
    return _registry


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (module or instance with hook implementations) in this process; returns
    its name. Everything it registers is checked at once (names, factories, clashes with the plugins
    already there): a plugin that is refused leaves the registry as it was."""
    global _registry
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
    _registry = None


def reset() -> None:
    """Forget loaded plugins; the next lookup reloads them (and re-reads ``MIXCOMPILE_PLUGINS``)."""
    global _pm, _registry
    _pm = None
    _registry = None


def lookup(kind: PluginKind, name: str) -> Registration:
    return registry().get(kind, name)


def _plugin_names(pm: pluggy.PluginManager) -> list[str]:
    return [n for n, _ in pm.list_name_plugin()]


def _register_builtins(pm: pluggy.PluginManager) -> None:
    import mixcompile_plugins

    for module in mixcompile_plugins.BUILTIN_PLUGINS:
        _checked_register(pm, module, module.__name__)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    selection = os.environ.get(ENV_VAR, "all").strip()
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)}
    if selection.lower() == "all":
        wanted = list(entry_points)
    elif selection.lower() in ("none", ""):
        wanted = []
    else:
        wanted = [part.strip() for part in selection.split(",") if part.strip()]
        for name in wanted:
            if name not in entry_points:
                raise UnknownNameError(f"entry point (in {ENV_VAR})", name, entry_points)
    for name in wanted:
        ep = entry_points[name]
        try:
            module: ModuleType | object = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {name!r} (entry point {ep.value!r}) failed to import: {type(exc).__name__}: {exc}. "
                f"Fix or uninstall it, or leave it out with {ENV_VAR}."
            ) from exc
        if pm.get_plugin(name) is None:
            _checked_register(pm, module, name)


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
            f"plugin {label!r} is malformed: {exc}. Hooks are: {hooks}, each taking one argument named "
            "'register'."
        ) from exc
    registered = registered or label
    if not pm.get_hookcallers(plugin):
        pm.unregister(name=registered)
        raise PluginError(
            f"plugin {label!r} implements no mixcompile hook: it needs at least one of {hooks} (marked with "
            "@mixcompile.hookimpl), each taking one argument named 'register'."
        )
    return registered
