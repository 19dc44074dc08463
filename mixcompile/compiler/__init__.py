"""The compiler: find the dense FFNs of any ``nn.Module`` and replace them with MoE / MoT blocks.

``inspect(model, ...)`` shows what would happen; ``convert(model, ...)`` does it (on a copy unless
``inplace=True``). Passes: :func:`trace_hierarchy` -> :func:`find_sites` -> :class:`Recipe` selection
-> rewrite -> verification. FFN shapes are :class:`Pattern` plugins (``register_patterns`` hook); a
pattern is written with what this module exports (:class:`TemplatePattern`, :func:`template`, the node
kinds), as the built-in ones are.
"""

from mixcompile.compiler.convert import convert, convert_with_report, inspect
from mixcompile.compiler.find import FFNSite, find_sites
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
