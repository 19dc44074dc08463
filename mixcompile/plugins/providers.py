"""Which installed package provided each plugin, so that a saved model can say what to install where one
is missing (:mod:`mixcompile.io.manifest` records it)."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Mapping
from types import ModuleType

from mixcompile.errors import UnknownNameError
from mixcompile.plugins.hookspecs import ENTRY_POINT_GROUP
from mixcompile.plugins.manager import lookup, plugin_manager
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


class _Distributions:
    """Which installed distribution provided a loaded plugin: the one of the entry point that loaded it,
    else the one holding its module (built-in, or registered in-process); the package a factory's class
    comes from may be another (a plugin may register a class it imports). Each listing is read once."""

    def __init__(self) -> None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        self.by_entry_point = {ep.name: ep.dist for ep in entry_points if ep.dist is not None}

    @functools.cached_property
    def by_module(self) -> Mapping[str, list[str]]:
        return importlib.metadata.packages_distributions()

    def provider(self, plugin: str) -> dict[str, str]:
        """``{"package": ..., "version": ...}`` for the plugin registered as ``plugin``, or {}."""
        dist = self.by_entry_point.get(plugin)
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
