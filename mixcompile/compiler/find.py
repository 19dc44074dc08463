"""Find the FFN sites of a model: trace it, match every registered pattern, keep each FFN once.

The same FFN shows up in the graph of its module and of every traceable ancestor; the deepest graph wins
(sites are claimed by the identity of their weight tensors), because the deepest owner gives the smallest
rewrite. Which rewrite a site admits is the next pass's question (:mod:`mixcompile.compiler.rewrite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from mixcompile.compiler.pattern import Match, Pattern
from mixcompile.compiler.trace import TracedUnit, TraceResult, trace_hierarchy
from mixcompile.compiler.view import DROPOUT, GraphView, build_view
from mixcompile.plugins.build import build_plugin
from mixcompile.plugins.manager import registry
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.types import TokenLayout

if TYPE_CHECKING:
    from mixcompile.compiler.rewrite import Rewrite


@dataclass
class FFNSite:
    """One dense FFN: where it lives, its canonical weights, and how it can be replaced."""

    index: int
    unit: TracedUnit
    match: Match
    finder: Pattern = field(repr=False)
    members: tuple[str, ...]  # paths of the modules the FFN calls, in data order
    layout: TokenLayout | None  # what the graph says of the FFN input's token layout (None: it does not say)
    hidden_dropout: float = 0.0  # the dropout between the projections, which the block applies
    dropouts: tuple[tuple[fx.Node, float, str | None], ...] = ()  # (node, p, attribute holding p)
    rewrite: Rewrite | None = None
    reason: str | None = None  # why no rewrite applies
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The module that owns the FFN's graph (``""`` is the model itself)."""
        return self.unit.path

    @property
    def label(self) -> str:
        return self.unit.label

    @property
    def pattern(self) -> str:
        return self.match.pattern

    @property
    def ffn(self) -> DenseFFN:
        return self.match.ffn

    def probe_module(self) -> str | None:
        """Path of a module whose input is the FFN input (to capture real inputs), if any."""
        users = [node for node in self.match.input.users if node in self.match.nodes]
        for node in users:
            if node.op == "call_module":
                return _join(self.path, str(node.target))
        return None


@dataclass
class Scan:
    sites: list[FFNSite]
    trace: TraceResult


def load_patterns() -> list[Pattern]:
    """Every registered pattern, built; a factory returning something else names its plugin."""
    return [build_plugin("pattern", name, expected=Pattern) for name in registry().names("pattern")]


def find_ffns(model: nn.Module, patterns: list[Pattern] | None = None) -> Scan:
    """Trace ``model`` and return its FFN sites in model order (how each can be rewritten is decided
    next, by :func:`mixcompile.compiler.rewrite.choose_rewrites`)."""
    patterns = load_patterns() if patterns is None else patterns
    trace = trace_hierarchy(model)
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    claimed: set[int] = set()
    found: list[tuple[tuple[int, int], FFNSite]] = []
    for unit in trace.units:
        view = build_view(unit)
        positions = {node: i for i, node in enumerate(unit.graph.nodes)}
        for pattern in patterns:
            for match in pattern.find(view):
                keys = view.weight_keys(match.nodes)
                if keys & claimed:
                    continue
                claimed |= keys
                site = _site(unit, match, pattern, view)
                first = min((order.get(m, len(order)) for m in site.members), default=order.get(unit.path, 0))
                found.append(((first, positions[match.output]), site))
    sites = [site for _, site in sorted(found, key=lambda item: item[0])]
    for index, site in enumerate(sites):
        site.index = index
    return Scan(sites, trace)


def _site(unit: TracedUnit, match: Match, pattern: Pattern, view: GraphView) -> FFNSite:
    ordered = [node for node in unit.graph.nodes if node in match.nodes]
    members = tuple(_join(unit.path, str(node.target)) for node in ordered if node.op == "call_module")
    dropouts = tuple((node, *view.dropout(node)) for node in ordered if view.kind(node) == DROPOUT)
    hidden_dropout = max((p for _, p, _ in dropouts), default=0.0)
    return FFNSite(-1, unit, match, pattern, members, static_layout(unit, match), hidden_dropout, dropouts)


_FLATTEN_METHODS = ("reshape", "view")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.Dropout, nn.Identity)


def static_layout(unit: TracedUnit, match: Match) -> TokenLayout | None:
    """The FFN input's token layout where the graph says it: ``nn.Transformer*`` layers declare
    ``batch_first``; an input that is ``x.reshape(-1, d)`` / ``x.view(-1, d)`` / ``x.flatten(0, 1)`` (seen
    through norms and dropouts, OPT's shape) is ``flat``. ``None`` where the graph does not say."""
    if isinstance(unit.module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return "batch_first" if unit.module.self_attn.batch_first else "seq_first"
    node = match.input
    for _ in range(4):
        if node.op == "call_method" and node.target in _FLATTEN_METHODS:
            args = node.args[1:]
            shape = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
            return "flat" if len(shape) == 2 else None
        if (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten
        ):
            return "flat" if tuple(node.args[1:3]) == (0, 1) or node.kwargs.get("end_dim") == 1 else None
        module = unit.module.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, _NORMS) and type(module).__name__.lower().find("norm") < 0:
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
