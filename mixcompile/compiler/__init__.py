"""The compiler: find the dense FFNs of any ``nn.Module`` and replace them with MoE / MoT blocks.

``inspect(model, ...)`` shows what would happen; ``convert(model, ...)`` does it (on a copy unless
``inplace=True``). Passes: :func:`trace_hierarchy` -> :func:`find_sites` -> :class:`Recipe` selection
-> rewrite -> verification. FFN shapes are :class:`Pattern` plugins (``register_patterns`` hook).
"""

from .convert import convert, convert_with_report, inspect
from .graph import GraphView
from .pattern import Match, Pattern, TemplatePattern
from .recipe import Recipe, recipes_of
from .report import Report, SiteReport
from .sites import FFNSite, find_sites
from .tracing import TraceResult, trace_hierarchy

__all__ = [
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
