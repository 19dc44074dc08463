"""The plugin system: hook specifications, the registry of what plugins registered, and building plugins.

A plugin (built-in or third-party) is a module or object with ``@hookimpl`` functions; see
:mod:`mixcompile.plugins.hookspecs` for the hooks and what each registered factory must return.
"""

from mixcompile.plugins.build import build_plugin
from mixcompile.plugins.hookspecs import (
    BuilderRegister,
    Initializer,
    InitializerRegister,
    KernelRegister,
    MixerRegister,
    PatternRegister,
    RouterRegister,
    hookimpl,
)
from mixcompile.plugins.manager import Registration, Registry, register_plugin, registry, unregister_plugin

__all__ = [
    "BuilderRegister",
    "Initializer",
    "InitializerRegister",
    "KernelRegister",
    "MixerRegister",
    "PatternRegister",
    "RouterRegister",
    "Registration",
    "Registry",
    "build_plugin",
    "hookimpl",
    "register_plugin",
    "registry",
    "unregister_plugin",
]
