"""mixcompile: compile dense PyTorch models into Mixture-of-Experts and Mixture-of-Tokens models.

The public face. Everything a user or a plugin author needs is importable from here (and patterns from
:mod:`mixcompile.compiler`); the modules behind it are organised by pipeline stage (see the README's
"How it works").
"""

from mixcompile.startup import guard_imports

guard_imports()  # first: what follows imports torch (a no-op unless this process is the command)
# ruff: noqa: E402

from mixcompile.compiler import Recipe, convert, convert_with_report, inspect
from mixcompile.errors import (
    ConfigError,
    LoadError,
    MixcompileError,
    PluginError,
    ShapeError,
    UnknownNameError,
    VerificationError,
    check_bool,
    check_choice,
    check_number,
    check_positive_int,
    warn,
)
from mixcompile.integrations.transformers_experts import register_transformers_experts
from mixcompile.io import load, save
from mixcompile.models import TinyGPT, build_tiny_gpt
from mixcompile.plugins import (
    BuilderRegister,
    Initializer,
    InitializerRegister,
    KernelRegister,
    MixerRegister,
    PatternRegister,
    RouterRegister,
    hookimpl,
    register_plugin,
    registry,
    unregister_plugin,
)
from mixcompile.runtime.blocks import Block, MoEBlock, MoTBlock, flop_matched_hidden
from mixcompile.runtime.checks import debug_checks
from mixcompile.runtime.experts import ExpertTensors, StackedExperts
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.runtime.introspect import aux_loss, sparse_blocks, stats, update_routing_bias
from mixcompile.runtime.kernels import Kernel
from mixcompile.runtime.mixing import MIN_TEMPERATURE, ControllerMixer, Mixer, MixPlan
from mixcompile.runtime.routing import LearnedRouter, Router, RouterBase, RoutingPlan, topk_routing
from mixcompile.runtime.tokens import token_mask
from mixcompile.runtime.transition import set_mot_temperature, temperature_schedule, to_token_choice
from mixcompile.types import (
    Activation,
    BlockKind,
    Layout,
    MoTMode,
    PluginKind,
    Sites,
    Sizing,
    SmallBatchPolicy,
    Strategy,
    TokenLayout,
)

__version__ = "0.1.0"

__all__ = [
    "ExpertTensors",
    "topk_routing",
    "debug_checks",
    "RouterBase",
    "LearnedRouter",
    "ControllerMixer",
    "Activation",
    "Block",
    "BlockKind",
    "ConfigError",
    "DenseFFN",
    "Kernel",
    "Layout",
    "LoadError",
    "MIN_TEMPERATURE",
    "MixPlan",
    "MixcompileError",
    "Mixer",
    "MoEBlock",
    "MoTBlock",
    "MoTMode",
    "PluginError",
    "PluginKind",
    "Recipe",
    "RouterRegister",
    "MixerRegister",
    "KernelRegister",
    "Initializer",
    "InitializerRegister",
    "PatternRegister",
    "BuilderRegister",
    "Router",
    "RoutingPlan",
    "ShapeError",
    "Sites",
    "Sizing",
    "SmallBatchPolicy",
    "StackedExperts",
    "Strategy",
    "TinyGPT",
    "TokenLayout",
    "UnknownNameError",
    "VerificationError",
    "aux_loss",
    "build_tiny_gpt",
    "check_bool",
    "check_choice",
    "check_number",
    "check_positive_int",
    "convert",
    "convert_with_report",
    "flop_matched_hidden",
    "hookimpl",
    "inspect",
    "load",
    "register_plugin",
    "register_transformers_experts",
    "registry",
    "save",
    "set_mot_temperature",
    "sparse_blocks",
    "stats",
    "temperature_schedule",
    "to_token_choice",
    "token_mask",
    "unregister_plugin",
    "warn",
    "update_routing_bias",
]
