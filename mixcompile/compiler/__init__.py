"""The compiler: find the dense FFNs of any ``nn.Module`` and replace them with MoE / MoT blocks.

``inspect(model, ...)`` shows what would happen; ``convert(model, ...)`` does it (on a copy unless
``inplace=True``). The passes, one module each, in order: ``trace`` (FX graphs per module), ``view``
(typed networkx graphs), ``find`` (pattern matches), ``rewrite`` (how each site can be replaced, and
later applying it), ``choose`` (the recipe's selection), ``build`` (the blocks), ``verify``, ``report``;
``recipe`` is the configuration and ``convert`` puts the passes together.

FFN shapes are :class:`Pattern` plugins (``register_patterns`` hook); a pattern is written with what this
module exports (:class:`TemplatePattern`, :func:`template`, the node kinds), as the built-in ones are.
"""

from mixcompile.compiler.convert import convert, convert_with_report, find_sites, inspect
from mixcompile.compiler.find import FFNSite
from mixcompile.compiler.pattern import ANY, INPUT, Match, Pattern, TemplatePattern, chain, template
from mixcompile.compiler.recipe import Recipe, recipes_of
from mixcompile.compiler.report import Report, SiteReport
from mixcompile.compiler.trace import TraceResult, trace_hierarchy
from mixcompile.compiler.view import ACT, CHUNK, DROPOUT, GETITEM, LINEAR, MUL, OTHER, GraphView

__all__ = [
    "ACT",
    "ANY",
    "CHUNK",
    "DROPOUT",
    "GETITEM",
    "INPUT",
    "LINEAR",
    "MUL",
    "OTHER",
    "chain",
    "template",
    "FFNSite",
    "GraphView",
    "Match",
    "Pattern",
    "Recipe",
    "Report",
    "SiteReport",
    "TemplatePattern",
    "TraceResult",
    "convert",
    "convert_with_report",
    "find_sites",
    "inspect",
    "recipes_of",
    "trace_hierarchy",
]
