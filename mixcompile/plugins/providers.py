"""Which installed package provided each plugin, so that a saved model can say what to install where one
is missing (:mod:`mixcompile.io.manifest` records it)."""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Mapping
from types import ModuleType
from typing import cast, get_args

from mixcompile.errors import UnknownNameError
from mixcompile.plugins.manager import entry_point_of, lookup, plugin_manager
from mixcompile.types import PluginKind


def installed_providers(plugins: Mapping[str, tuple[PluginKind, str]]) -> dict[str, dict[str, str]]:
    """``{key: {"package": ..., "version": ...}}`` for each ``key: (kind, name)`` of ``plugins``, in key
    order, from the installed package behind it (see :class:`_Distributions`). A plugin no installed
    package provided (registered in-process), or not registered at all, is left out."""
    distributions = _Distributions()
    providers = {}
    for key, (kind, name) in sorted(plugins.items()):
        try:
            plugin = lookup(kind, name).plugin
        except UnknownNameError:
            continue
        provider = distributions.provider(plugin)
        if provider:
            providers[key] = provider
    return providers


def changed_providers(recorded: Mapping[str, Mapping[str, str]]) -> list[str]:
    """How the plugins a saved model recorded (``{"router:sharp": {"package": ..., "version": ...}}``) are
    provided here, in words, where that differs from when it was saved: another package, another version
    of it, or a plugin registered in-process. Any of them may compute something else (a changed default, a
    changed formula). Left out: mixcompile's own plugins (the manifest's format version covers them), the
    initializers (a load reads the weights they made) and plugins not registered here (a load names them
    as missing)."""
    distributions = _Distributions()
    changes = []
    for key, then in sorted(recorded.items()):
        kind, _, name = key.partition(":")
        if kind not in get_args(PluginKind) or kind == "initializer" or then.get("package") == _MIXCOMPILE:
            continue
        try:
            plugin = lookup(cast(PluginKind, kind), name).plugin
        except UnknownNameError:
            continue
        now = distributions.provider(plugin)
        if not now:
            changes.append(f"{kind} {name!r} is registered in-process here, not by {provider_words(then)}")
        elif _normalized(now["package"]) != _normalized(then["package"]):
            changes.append(f"{kind} {name!r} comes from {provider_words(now)}, not {provider_words(then)}")
        elif now.get("version") != then.get("version"):
            changes.append(
                f"{kind} {name!r} comes from {provider_words(now)}, not {then.get('version', 'unversioned')}"
            )
    return changes


def _normalized(package: str) -> str:
    """A distribution's name as packaging compares it (``Extk_Pkg`` is ``extk-pkg``)."""
    return re.sub(r"[-_.]+", "-", package).lower()


def provider_words(found: Mapping[str, str] | None) -> str:
    """``package 'revplug' 0.3.1`` for a recorded provider, "" for none."""
    if not found or "package" not in found:
        return ""
    return f"package {found['package']!r}" + (f" {found['version']}" if found.get("version") else "")


_MIXCOMPILE = "mixcompile"  # the distribution of mixcompile and its built-in plugins


class _Distributions:
    """Which installed distribution provided a loaded plugin: the one of the entry point that loaded it,
    else the one holding its module (built-in, or registered in-process); the package a factory's class
    comes from may be another (a plugin may register a class it imports). Each listing is read once."""

    @functools.cached_property
    def by_module(self) -> Mapping[str, list[str]]:
        return importlib.metadata.packages_distributions()

    def provider(self, plugin: str) -> dict[str, str]:
        """``{"package": ..., "version": ...}`` for the plugin registered as ``plugin``, or {}."""
        dist = getattr(entry_point_of(plugin), "dist", None)
        if dist is not None:
            return {"package": dist.name, "version": dist.version}
        held = plugin_manager().get_plugin(plugin)
        module = held.__name__ if isinstance(held, ModuleType) else type(held).__module__
        packages = self.by_module.get(module.split(".")[0], [])
        if not packages:
            return {}
        try:
            version = importlib.metadata.version(packages[0])
        except importlib.metadata.PackageNotFoundError:
            version = ""
        return {"package": packages[0], **({"version": version} if version else {})}
