"""Graph edit: the rewrite for an FFN written inline in a (non-root) module's ``forward``.

The owner is traced exactly with its children as leaves, in train and in eval mode (the two graphs merged,
the ``training`` flag functional dropouts read kept live as ``self.training``); each FFN's nodes become one
``call_module`` of its block, and the graph becomes the owner's forward (an :class:`EditedForward` on the
module itself, so its class, its other attributes, buffers and hooks stay). Refused where a graph would not
compute what the forward does: a forward that traces differently in the two modes, uses grad modes or
autocast (a graph does not record them), or branches on whether an optional argument is given.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from torch import fx, nn

from mixcompile.compiler.bytecode import names_read
from mixcompile.compiler.pattern import Match
from mixcompile.compiler.trace import LeafTracer, TracedUnit, helper_methods, trace_module
from mixcompile.compiler.view import GraphView, build_view
from mixcompile.runtime.rewritten import EditedForward, edited_graph

if TYPE_CHECKING:
    from mixcompile.compiler.find import FFNSite


@dataclass(frozen=True)
class InPlaceEdit:
    """What editing one owner changes: its new attributes (the blocks), the FFNs' members nothing reads
    any more (to be emptied), and its new forward."""

    blocks: dict[str, nn.Module]
    emptied: list[str]
    forward: EditedForward


def refusal(site: FFNSite) -> str | None:
    """Why the site's owner cannot have its forward edited, or ``None`` if it can."""
    unit = site.unit
    if not unit.path:
        return "no graph edit: the FFN is inline in the model's own forward (its class would change)"
    if unit.method != "forward":
        return f"no graph edit: the FFN is in {unit.method}(), not forward"
    try:
        _, view = _shallow(unit.module, unit.path)
    except _ModesDiffer:
        return "no graph edit: its forward differs in train and eval mode (a GraphModule would freeze one)"
    except Exception as exc:  # noqa: BLE001 - why the exact trace failed is the reason we report
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"no graph edit: its forward does not trace exactly ({type(exc).__name__}: {text})"
    if _rematch(site, view) is None:
        return "no graph edit: part of the FFN is computed inside a child module's forward"
    code_names = names_read(unit.module, ("forward", *helper_methods(unit.module)))
    modes = sorted(_GRAD_MODES & code_names) + _mode_decorators(unit.module)
    if modes:
        return (
            f"no graph edit: its forward uses {', '.join(modes)}, which a traced graph does not record (the "
            "edited forward would compute gradients or precision differently)"
        )
    branches = _optional_branches(unit.module)
    if branches:
        return (
            f"no graph edit: its forward branches on whether {', '.join(map(repr, branches))} is given, and "
            "an edited graph would keep one branch"
        )
    return None


def edit(path: str, owner: nn.Module, group: list[tuple[FFNSite, nn.Module]]) -> InPlaceEdit:
    """The owner's forward as its graph with each FFN one call of its block: the blocks, the FFNs' modules
    and parameters emptied (set to ``None``; nothing else reads them), and the new forward."""
    graph, view = _shallow(owner, path)
    before = _targets(graph)
    blocks: dict[str, nn.Module] = {}
    for site, block in group:
        match = _rematch(site, view)
        assert match is not None, f"site {site.label} vanished between planning and rewriting"
        name = _block_name(match, graph, owner, blocks)
        blocks[name] = block
        with graph.inserting_before(match.output):
            replacement = graph.call_module(name, (match.input,))
        match.output.replace_all_uses_with(replacement)
        for node in reversed([n for n in graph.nodes if n in match.nodes]):
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)
    emptied = sorted(before - _targets(graph) - set(blocks))
    return InPlaceEdit(blocks, emptied, EditedForward(owner, graph))


_GRAD_MODES = {"no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast"}


def _mode_decorators(owner: nn.Module) -> list[str]:
    """The grad-mode or autocast decorators on the owner's ``forward`` (``@torch.no_grad()``): an edited
    forward replaces the decorated function, decorators and all."""
    found = []
    function: object = getattr(type(owner), "forward", None)
    while hasattr(function, "__wrapped__"):
        code = getattr(function, "__code__", None)
        where = code.co_filename.replace("\\", "/") if code is not None else ""
        found += [what for file, what in _MODE_DECORATORS.items() if where.endswith(file)]
        function = function.__wrapped__
    return found


_MODE_DECORATORS = {
    "torch/utils/_contextlib.py": "a grad-mode decorator (@torch.no_grad() or the like)",
    "torch/amp/autocast_mode.py": "an @autocast decorator",
}


def _optional_branches(owner: nn.Module) -> list[str]:
    """The ``forward`` parameters defaulting to ``None`` whose absence changes what it computes (``if mask
    is not None: ...``): an exact trace takes each given, so an edited forward would fail or compute the
    wrong branch when one is left out. Found by tracing again with each left out."""
    params = list(inspect.signature(type(owner).forward).parameters.values())[1:]
    optional = [p.name for p in params if p.default is None and p.kind is not p.VAR_KEYWORD]
    if not optional or edited_graph(owner) is not None:  # an edited forward: checked when it was made
        return []
    opaque = set(owner.children())
    given = _calls(trace_module(owner, opaque, analysis=False)[0])
    differ = []
    for name in optional:
        try:
            left_out = LeafTracer(opaque, analysis=False).trace(owner, concrete_args={name: None})
        except Exception:  # noqa: BLE001 - the forward needs it after all: nobody can leave it out
            continue
        if _calls(left_out) != given:
            differ.append(name)
    return differ


def _calls(graph: fx.Graph) -> list[tuple[str, object]]:
    return [
        (n.op, n.target)
        for n in graph.nodes
        if n.op in ("call_module", "call_function", "call_method")
        and getattr(n.target, "__name__", None) != "_assert_is_none"  # what leaving one out adds
    ]


class _ModesDiffer(Exception):
    """The exact traces in train and eval mode differ by more than the training flag."""


def _shallow(owner: nn.Module, path: str) -> tuple[fx.Graph, GraphView]:
    """The owner traced exactly (no assumed dtypes), with its children as leaves: what a GraphModule runs.

    It is traced in train and in eval mode; constants that are ``True`` in one and ``False`` in the other
    (``F.dropout(h, p, training=self.training)``) become a ``get_attr`` of ``training``, so the GraphModule
    reads its own mode. Any other difference raises :class:`_ModesDiffer`."""
    modes = {module: module.training for module in owner.modules()}
    graphs = []
    try:
        for mode in (True, False):
            owner.train(mode)
            graphs.append(trace_module(owner, set(owner.children()), analysis=False)[0])
    finally:
        for module, mode in modes.items():
            module.training = mode
    graph = _merge_modes(*graphs)
    return graph, build_view(TracedUnit(path, "forward", owner, graph, False))


def _merge_modes(train: fx.Graph, evaluation: fx.Graph) -> fx.Graph:
    pairs = list(zip(train.nodes, evaluation.nodes, strict=False))
    if len(train.nodes) != len(evaluation.nodes) or any(
        (a.op, a.target, a.name) != (b.op, b.target, b.name) for a, b in pairs
    ):
        raise _ModesDiffer()
    flag: list[fx.Node] = []

    def merged(a: object, b: object) -> object:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name):
                raise _ModesDiffer()
            return a
        if a is True and b is False:
            if not flag:
                first = next(n for n in train.nodes if n.op != "placeholder")
                with train.inserting_before(first):
                    flag.append(train.get_attr("training"))
            return flag[0]
        if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
            return type(a)(merged(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return {key: merged(a[key], b[key]) for key in a}
        if type(a) is not type(b) or a != b:
            raise _ModesDiffer()
        return a

    for a, b in pairs:
        a.args, a.kwargs = merged(a.args, b.args), merged(a.kwargs, b.kwargs)
    return train


def _rematch(site: FFNSite, view: GraphView) -> Match | None:
    """The site found again in another graph of the same module (same weights read)."""
    wanted = build_view(site.unit).weight_keys(site.match.nodes)
    return next((m for m in site.finder.find(view) if view.weight_keys(m.nodes) == wanted), None)


def _targets(graph: fx.Graph) -> set[str]:
    return {
        str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr") and n.target != "training"
    }


def _block_name(match: Match, graph: fx.Graph, owner: nn.Module, taken: dict[str, nn.Module]) -> str:
    """Name the block after the projection it replaces, unless something outside the FFN still uses it
    (or the owner has another attribute of that name)."""
    first = next(n for n in match.input.users if n in match.nodes)
    # A functional linear's weight is a get_attr node (view._classify checked it).
    target = first.target if first.op == "call_module" else cast(fx.Node, first.args[1]).target
    name = str(target).replace(".", "_")
    ffn_targets = {str(n.target) for n in match.nodes if n.op in ("call_module", "get_attr")}
    used = set(taken) | {
        str(n.target).split(".")[0]
        for n in graph.nodes
        if n.op in ("call_module", "get_attr") and n not in match.nodes
    }
    used |= {a for a in dir(owner) if a not in ffn_targets}
    while name in used:
        name += "_moe"
    return name
