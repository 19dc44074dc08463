"""mixcompile's built-in plugins.

They register through the same hooks (``mixcompile.plugins.hookspecs``) a third-party package uses; the only
difference is that mixcompile always loads them, without an entry point.
"""

from mixcompile_plugins import builders, initializers, kernels, mixers, patterns, routers
from mixcompile_plugins.triton import plugin as triton_plugin

BUILTIN_PLUGINS = (routers, mixers, kernels, initializers, patterns, triton_plugin, builders)
