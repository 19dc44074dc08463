"""mixcompile: compile dense PyTorch models into Mixture-of-Experts and Mixture-of-Tokens models."""

from .blocks import MoEBlock, MoTBlock, flop_matched_hidden
from .compiler import Recipe, convert, convert_with_report, inspect  # noqa: E402
from .errors import ConfigError, LoadError, MixcompileError, PluginError, ShapeError, UnknownNameError
from .experts import StackedExperts
from .ffn import DenseFFN
from .hookspecs import hookimpl
from .introspect import aux_loss, sparse_blocks, stats, update_routing_bias
from .io import load, save  # noqa: E402
from .kernels import Kernel
from .mixing import Mixer, MixPlan
from .registry import register_plugin, unregister_plugin
from .registry import registry as plugins
from .routing import Router, RoutingPlan

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DenseFFN",
    "Kernel",
    "LoadError",
    "MixPlan",
    "MixcompileError",
    "Mixer",
    "MoEBlock",
    "MoTBlock",
    "PluginError",
    "Router",
    "RoutingPlan",
    "ShapeError",
    "StackedExperts",
    "UnknownNameError",
    "Recipe",
    "aux_loss",
    "convert",
    "convert_with_report",
    "inspect",
    "load",
    "save",
    "flop_matched_hidden",
    "hookimpl",
    "register_plugin",
    "plugins",
    "sparse_blocks",
    "stats",
    "unregister_plugin",
    "update_routing_bias",
]
