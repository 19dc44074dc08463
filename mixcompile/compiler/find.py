"""Find the FFN sites of a model: trace it, match every registered pattern, keep each FFN once.

The same FFN shows up in the graph of its module and of every traceable ancestor; the deepest graph wins
(sites are claimed by the identity of their projections), because the deepest owner gives the smallest
rewrite. Which rewrite a site admits is the next pass's question (:mod:`mixcompile.compiler.rewrite`).

Some FFNs are found but must stay dense whatever rewrite would fit (``FFNSite.blocked``): one whose
weights are tied to an earlier site's (converting both would untie them), one with a projection whose
weight is computed (a parametrization, a hook), and one whose hidden ``F.dropout`` does not follow the
module's own ``self.training`` (the block would drop in training only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from mixcompile.compiler.linears import computed_weight_reason
from mixcompile.compiler.pattern import Match, Pattern
from mixcompile.compiler.trace import TracedUnit, TraceResult, TrainingFlag, trace_hierarchy, trace_module
from mixcompile.compiler.view import DROPOUT, GraphView, build_view, dropout_training
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
    notes: list[str] = field(default_factory=list)
    blocked: str | None = None  # why the site stays dense whatever rewrite would fit (find's verdict)
    rewrite: Rewrite | None = None  # never set for a blocked site
    reason: str | None = None  # why no rewrite applies (a blocked site's: find's verdict)

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
    claimed: set[int] = set()  # projections already in a site
    owners: dict[int, FFNSite] = {}  # weight identity -> the first site reading it
    found: list[tuple[tuple[int, int], FFNSite]] = []
    for unit in trace.units:
        view = build_view(unit)
        positions = {node: i for i, node in enumerate(unit.graph.nodes)}
        for pattern in patterns:
            for match in pattern.find(view):
                linears = view.linear_keys(match.nodes)
                if linears & claimed:
                    continue
                claimed |= linears
                site = _site(unit, match, pattern, view)
                tied = _tied(site, view.weight_keys(match.nodes), owners)
                site.blocked = tied or _hygiene(site, view, trace)
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


def _tied(site: FFNSite, keys: frozenset[int], owners: dict[int, FFNSite]) -> str | None:
    """Why ``site`` must stay dense because it reads weights an earlier site reads (tied weights: one
    block would untie them); the earlier site gets a note. Claims the weights otherwise."""
    first = next((owners[key] for key in keys if key in owners), None)
    for key in keys:
        owners.setdefault(key, site)
    if first is None:
        return None
    if first.blocked is None:
        first.notes.append(f"shares weights with {site.label}, which stays dense: converting it unties them")
    return f"its weights are tied to (shared with) the FFN at {first.label}; one block cannot hold both"


def _hygiene(site: FFNSite, view: GraphView, trace: TraceResult) -> str | None:
    """Why the FFN's dense weights or hidden dropout do not say what it computes, or ``None``."""
    for node in (node for node in site.unit.graph.nodes if node in site.match.nodes):  # in data order
        module = view.module(node)
        why = computed_weight_reason(module) if module is not None else None
        if why is not None:
            path = _join(site.path, str(node.target))
            return f"{path} ({type(module).__name__}): {why}; a block would copy .weight as it stands once"
    return _settle_dropouts(site, trace)


def _settle_dropouts(site: FFNSite, trace: TraceResult) -> str | None:
    """Check each functional hidden dropout follows ``self.training`` (the block drops in training only):
    one that never drops (``training=False``) gets p = 0; one that cannot be decided blocks the site."""
    functional = [(node, p) for node, p, _ in site.dropouts if node.op == "call_function" and p > 0]
    if not functional:
        return None
    traces = _mode_traces(site.unit, trace.opaque)
    if isinstance(traces, str):
        return f"its hidden dropout's training flag cannot be read: {traces}"
    never = set()
    for node, p in functional:
        verdict = _training_verdict(node, traces)
        if verdict == _NEVER:
            never.add(node)
        elif verdict != _FOLLOWS:
            return f"its hidden dropout {node.name} (p={p}) {verdict}: the block would drop in training only"
    site.dropouts = tuple((n, 0.0, None) if n in never else (n, p, a) for n, p, a in site.dropouts)
    site.hidden_dropout = max((p for _, p, _ in site.dropouts), default=0.0)
    return None


_FOLLOWS, _NEVER = "follows self.training", "never drops"


def _mode_traces(unit: TracedUnit, opaque: set[nn.Module]) -> dict[bool, dict[str, fx.Node]] | str:
    """The unit traced in train and in eval mode with its ``training`` a :class:`TrainingFlag`, nodes by
    name (one code path names its nodes alike), or why a trace failed."""
    traces = {}
    for mode in (True, False):
        try:
            graph, _ = trace_module(unit.module, opaque, method=unit.method, mode=mode)
        except Exception as exc:  # noqa: BLE001 - a failure only means the flag cannot be read
            return f"{unit.label} does not trace in {'train' if mode else 'eval'} mode ({type(exc).__name__})"
        traces[mode] = {node.name: node for node in graph.nodes}
    return traces


def _training_verdict(node: fx.Node, traces: dict[bool, dict[str, fx.Node]]) -> str:
    """Whether the dropout's ``training`` argument is the module's own mode, never true, or neither (why)."""
    flags = {}
    for mode, nodes in traces.items():
        twin = nodes.get(node.name)
        if twin is None or twin.target is not node.target:
            return f"is not called in {'train' if mode else 'eval'} mode alike"
        flags[mode] = dropout_training(twin)
    train, evaluation = flags[True], flags[False]
    if isinstance(train, TrainingFlag) and isinstance(evaluation, TrainingFlag):
        return _FOLLOWS
    if isinstance(train, int) and isinstance(evaluation, int) and not train and not evaluation:
        return _NEVER  # bools are ints: False, or self.training anded with a false flag
    return (
        f"gets training={_describe(train)} in train mode and {_describe(evaluation)} in eval mode, "
        "not exactly self.training"
    )


def _describe(flag: object) -> str:
    if isinstance(flag, TrainingFlag):
        return "self.training"
    return "a value computed in the graph" if isinstance(flag, fx.Node) else repr(flag)


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
