"""mixcompile's built-in plugins.

They register through the same hooks (``mixcompile.hookspecs``) a third-party package uses; the only
difference is that mixcompile always loads them, without an entry point.
"""

from . import builders, initializers, kernels, mixers, patterns, routers, triton_kernels

BUILTIN_PLUGINS = (routers, mixers, kernels, initializers, patterns, triton_kernels, builders)
