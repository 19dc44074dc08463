"""Decide how each FFN site can be replaced, and turn the decisions into attribute assignments.

Three rewrites, preferred in this order:

1. **Module swap**: the FFN is exactly one module (LlamaMLP, GPT2MLP, T5DenseActDense, nanoGPT's MLP) ->
   the parent gets the block instead. Dropouts the module applies to its output are kept after the block.
2. **Chain collapse**: the FFN is a straight chain of calls (BERT's ``intermediate.dense`` ->
   ``output.dense``, ``TransformerEncoderLayer.linear1 -> activation -> dropout -> linear2``, a slice of an
   ``nn.Sequential``, BART's ``fc1 -> activation_fn -> F.dropout(p=self.activation_dropout) -> fc2``) ->
   the first module holds the block, the other modules (and function attributes) become identities, and a
   functional hidden dropout is turned off by setting the attribute its probability is read from to 0;
   everything around them (residuals, norms, other dropouts, the forward's own arguments and control
   flow) is untouched.
3. **Graph edit**: the FFN is inline code in a (non-root) module's ``forward`` (functional or method
   activations, ``F.linear`` on bare parameters) -> that module's forward becomes its traced graph, where
   the FFN's nodes are one call of the block (:mod:`mixcompile.compiler.graph_edit`).

A dropout *between* the projections is applied by the block itself (its ``hidden_dropout``).

Every rewrite is a list of :class:`Assignment` s (set attribute ``name`` of module ``path``), so applying
is uniform and can be undone when verification fails, leaving the model as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx, nn

from mixcompile.compiler import graph_edit
from mixcompile.compiler.bytecode import attributes_used
from mixcompile.compiler.trace import TracedUnit, helper_methods
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.runtime.rewritten import KeywordInput

if TYPE_CHECKING:
    from mixcompile.compiler.find import FFNSite, Scan

MODULE_SWAP, CHAIN_COLLAPSE, GRAPH_EDIT = "module_swap", "chain_collapse", "graph_edit"


@dataclass(frozen=True)
class Assignment:
    path: str  # the module whose attribute changes ("" is the model)
    name: str
    value: object


@dataclass(frozen=True)
class Rewrite:
    """How a site is replaced. ``target`` is where the block ends up; ``identities`` are emptied."""

    method: str
    target: str
    identities: tuple[str, ...] = ()  # module paths (or function attributes) that become identities
    trailing: tuple[str, ...] = ()  # module swap: dropouts kept after the block
    guards: tuple[Assignment, ...] = ()  # flags that keep fused fast paths off
    also: tuple[str, ...] = ()  # module swap: the other paths of a module registered at several (shared)

    def describe(self) -> str:
        text = f"{self.method}: {self.target or '<root>'} <- block"
        if self.also:
            text += f" (shared: also {', '.join(self.also)})"
        if self.trailing:
            text += f" (then {', '.join(self.trailing)})"
        if self.identities:
            text += f"; identity: {', '.join(self.identities)}"
        return text


def choose_rewrites(scan: Scan, model: nn.Module) -> None:
    """Give every site of ``scan`` the first rewrite it admits, or the reasons it admits none."""
    for site in scan.sites:
        owners = [unit for unit in scan.trace.units if unit.module is site.unit.module]
        choose_rewrite(site, model, owners)


def choose_rewrite(site: FFNSite, model: nn.Module, owner_units: list[TracedUnit]) -> None:
    """Fill ``site.rewrite`` with the first rewrite that applies, or ``site.reason`` with why none does (a
    site find blocked keeps find's reason)."""
    if site.blocked is not None:
        site.reason = site.blocked
        return
    dtypes = _weight_dtypes(site.ffn)
    if len(dtypes) > 1:  # stacked experts hold one dtype, and the dense FFN casts between its projections
        site.reason = (
            f"its weights are in {' and '.join(dtypes)} (transformers keeps some projections in float32 in "
            "a float16 model, T5's wo for one): load the model in one dtype (float32 or bfloat16)"
        )
        return
    reasons = []
    for attempt in (_module_swap, _chain_collapse, _graph_edit):
        outcome = attempt(site, model, owner_units)
        if isinstance(outcome, Rewrite):
            site.rewrite = outcome
            break
        reasons.append(outcome)
    else:
        site.reason = "; ".join(reasons)


def _weight_dtypes(ffn: DenseFFN) -> list[str]:
    tensors = (ffn.w_in, ffn.w_gate, ffn.w_out, ffn.b_in, ffn.b_gate, ffn.b_out)
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t is not None})


def assignments(model: nn.Module, planned: Iterable[tuple[FFNSite, nn.Module]]) -> list[Assignment]:
    """The attribute assignments that put each block in place of its site."""
    result: list[Assignment] = []
    edits: dict[str, list[tuple[FFNSite, nn.Module]]] = {}
    for site, block in planned:
        rewrite = site.rewrite
        if rewrite is None:
            continue
        if rewrite.method == GRAPH_EDIT:
            edits.setdefault(site.path, []).append((site, block))
            continue
        value = block
        if rewrite.trailing:
            value = nn.Sequential(block, *(model.get_submodule(path) for path in rewrite.trailing))
        if rewrite.method == MODULE_SWAP:
            _accept_keyword(value, site.unit.module)
            # A module registered at several places (shared by layers) is replaced at each, still shared.
            result.extend(Assignment(*_split(path), value) for path in (rewrite.target, *rewrite.also))
        else:
            result.append(Assignment(*_split(rewrite.target), value))
        result.extend(Assignment(*_split(path), nn.Identity()) for path in rewrite.identities)
        result.extend(rewrite.guards)
    for owner, group in edits.items():
        edited = graph_edit.edit(owner, model.get_submodule(owner), group)
        result.extend(Assignment(*_split(_join(owner, member)), None) for member in edited.emptied)
        result.extend(Assignment(owner, name, block) for name, block in edited.blocks.items())
        result.append(Assignment(owner, "forward", edited.forward))
    return result


def _paths_of(model: nn.Module, path: str) -> list[str]:
    """Every path where the module at ``path`` is registered."""
    module = model.get_submodule(path)
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module]


def _accept_keyword(value: nn.Module, ffn: nn.Module) -> None:
    """Let the block take its input under the name the FFN module's forward gave it: a parent calling
    ``self.mlp(hidden_states=h)`` calls the block so too."""
    names = list(inspect.signature(type(ffn).forward).parameters)
    if len(names) > 1:
        value.register_forward_pre_hook(KeywordInput(names[1]), with_kwargs=True)


def apply(model: nn.Module, changes: list[Assignment]) -> Callable[[], None]:
    """Make the assignments, all or none (one that fails undoes those made before it); returns a function
    that restores every attribute as it was."""
    undo: list[tuple[nn.Module, str, object, bool]] = []

    def restore() -> None:  # once: a second call (an error raised after a restore) changes nothing
        while undo:
            owner, name, old, own = undo.pop()
            if not own:  # a new attribute (a block's), or one over the class's (an edited forward)
                delattr(owner, name)
                continue
            if not isinstance(old, nn.Module):
                owner._modules.pop(name, None)  # a function attribute that an identity module replaced
            setattr(owner, name, old)

    try:
        for change in changes:
            owner = model.get_submodule(change.path)
            own = any(
                change.name in d for d in (vars(owner), owner._modules, owner._parameters, owner._buffers)
            )
            undo.append((owner, change.name, getattr(owner, change.name, None), own))
            setattr(owner, change.name, change.value)
    except BaseException:
        restore()
        raise
    return restore


# ---- the three checks -----------------------------------------------------------------------------------


def _module_swap(site: FFNSite, model: nn.Module, owner_units: list[TracedUnit]) -> Rewrite | str:
    unit, match = site.unit, site.match
    if unit.method != "forward":
        return f"no module swap: the FFN is in {unit.method}(), not a whole forward"
    if not unit.path:
        return "no module swap: the FFN is the model itself"
    module = unit.module
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    ):
        return "no module swap: the module has hooks, which a block in its place would not run"
    params = list(inspect.signature(type(unit.module).forward).parameters.values())[1:]
    if len(params) != 1 or params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return "no module swap: its forward takes arguments besides the FFN input, which a block would not"
    used = [n for n in unit.graph.nodes if n.op == "placeholder" and n.users]
    if used != [match.input]:
        return "no module swap: the module's forward computes more than the FFN from its inputs"
    tail, trailing = match.output, []
    while len(tail.users) == 1:
        user = next(iter(tail.users))
        if user.op != "call_module" or not isinstance(
            unit.module.get_submodule(str(user.target)), nn.Dropout
        ):
            break
        trailing.append(user)
        tail = user
    computed = {n for n in unit.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    output = next(n for n in unit.graph.nodes if n.op == "output")
    if computed != set(match.nodes) | set(trailing) or output.args[0] is not tail:
        return "no module swap: the module's forward does more than the FFN"
    also = tuple(path for path in _paths_of(model, unit.path) if path != unit.path)
    trailing_paths = tuple(_join(unit.path, str(n.target)) for n in trailing)
    return Rewrite(MODULE_SWAP, unit.path, trailing=trailing_paths, also=also)


def _chain_collapse(site: FFNSite, model: nn.Module, owner_units: list[TracedUnit]) -> Rewrite | str:
    unit, match = site.unit, site.match
    ordered = [n for n in unit.graph.nodes if n in match.nodes]
    previous = match.input
    members: list[str] = []
    turned_off: list[Assignment] = []
    dropouts = {node: (p, attr) for node, p, attr in site.dropouts}
    hidden = _untraced_names(unit, owner_units)
    for node in ordered:
        if (
            not node.args
            or node.args[0] is not previous
            or (node is not match.output and len(node.users) != 1)
        ):
            return "no chain collapse: the FFN is not a straight chain of calls"
        previous = node
        member = _chain_member(node, unit)
        if member is None and node.op == "call_function" and node in dropouts:
            p, attr = dropouts[node]
            outcome = _functional_dropout(p, attr, owner_units, hidden)
            if isinstance(outcome, str):
                return f"no chain collapse: {outcome}"
            turned_off.extend(Assignment(unit.path, name, 0.0) for name in outcome)
            continue
        if member is None:
            return f"no chain collapse: {node.format_node()} is neither a module nor a function attribute"
        members.append(member)
    if ordered[0].op != "call_module":
        return "no chain collapse: the first projection is not a module"
    for node in ordered:
        if node.op == "call_module" and not _called_once(str(node.target), owner_units):
            return f"no chain collapse: module {node.target!r} is called more than once"
        emptied = node.op == "call_function" and node not in dropouts  # a function attribute
        if emptied and _function_calls(node.target, owner_units) > 1:
            called = getattr(node.target, "__name__", node.target)
            return f"no chain collapse: {called} is also called outside the FFN"
    for member in members:
        name = member.removeprefix(f"{unit.path}.") if unit.path else member
        if name.split(".")[0] in hidden:
            return (
                f"no chain collapse: self.{name.split('.')[0]} is also used by {type(unit.module).__name__}."
                "forward, which does not trace"
            )
    modules = [_join(unit.path, str(n.target)) for n in ordered if n.op == "call_module"]
    shared = _shared_members(model, unit.path, modules)
    if shared:
        return f"no chain collapse: {shared!r} is also used outside {unit.label}"
    guards = (*_fast_path_guards(model, unit), *turned_off)
    return Rewrite(CHAIN_COLLAPSE, members[0], identities=tuple(members[1:]), guards=guards)


def _functional_dropout(
    p: float, attr: str | None, owner_units: list[TracedUnit], untraced: set[str]
) -> tuple[str, ...] | str:
    """The attribute to set to 0 so a functional hidden dropout becomes a no-op (none if it is one
    already), or why that cannot be done: its probability is a literal, or an attribute other calls of
    the module read too (in its graphs, or in ``untraced`` code)."""
    if attr is None or p == 0:
        return () if p == 0 else f"the hidden dropout's probability {p} is a literal, not an attribute"
    if attr in untraced:
        return f"the hidden dropout's probability self.{attr} is also read by a forward that does not trace"
    readers = sum(
        1
        for unit in owner_units
        for node in unit.graph.nodes
        for arg in (*node.args, *node.kwargs.values())
        if getattr(arg, "attr", None) == attr
    )
    if readers > 1:
        return (
            f"the hidden dropout's probability self.{attr}={p} is also read by other calls of the module, "
            "so it cannot be set to 0 for the FFN alone"
        )
    return (attr,)


def _graph_edit(site: FFNSite, model: nn.Module, owner_units: list[TracedUnit]) -> Rewrite | str:
    reason = graph_edit.refusal(site)
    return reason if reason is not None else Rewrite(GRAPH_EDIT, site.unit.path)


# ---- helpers --------------------------------------------------------------------------------------------


def _chain_member(node: fx.Node, unit: TracedUnit) -> str | None:
    """The path that can be emptied for ``node``: its module, or the attribute holding its function."""
    if node.op == "call_module":
        return _join(unit.path, str(node.target))
    if node.op != "call_function":
        return None
    method = getattr(type(unit.module), unit.method)
    names = getattr(getattr(method, "__code__", None), "co_names", ())
    for name, value in vars(unit.module).items():
        if value is node.target and name in names:
            return _join(unit.path, name)
    return None


def _function_calls(function: object, owner_units: list[TracedUnit]) -> int:
    """Calls of ``function`` in the owner's graphs: a function attribute emptied for the FFN must not be
    called anywhere else (``self.act = F.gelu`` used by the FFN and by another branch)."""
    return sum(
        1 for u in owner_units for n in u.graph.nodes if n.op == "call_function" and n.target is function
    )


def _untraced_names(unit: TracedUnit, owner_units: list[TracedUnit]) -> set[str]:
    """Attributes the owner's untraced code uses: where ``forward`` does not trace and the FFN was found
    in a helper method, whatever else ``forward`` (or an untraced helper) does with the FFN's members is in
    no graph, so emptying them could change that code (reading ``self.fc2.weight.dtype`` included). Only
    ``nn.Transformer*Layer``'s fast-path reads of ``self.linear1.weight`` are not uses: the guards the
    rewrite sets keep that path off."""
    traced = {u.method for u in owner_units}
    if "forward" in traced:
        return set()
    through = not isinstance(unit.module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer)
    untraced = [m for m in ("forward", *helper_methods(unit.module)) if m not in traced]
    return attributes_used(unit.module, untraced, through)


def _called_once(target: str, owner_units: list[TracedUnit]) -> bool:
    calls = sum(1 for u in owner_units for n in u.graph.nodes if n.op == "call_module" and n.target == target)
    return calls == 1


def _shared_members(model: nn.Module, owner_path: str, members: list[str]) -> str | None:
    """A member registered in more places than its owner is shared with other code."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    owner_count = counts[id(model.get_submodule(owner_path))]
    for path in members:
        if counts[id(model.get_submodule(path))] != owner_count:
            return path
    return None


def _fast_path_guards(model: nn.Module, unit: TracedUnit) -> tuple[Assignment, ...]:
    """``nn.TransformerEncoderLayer`` (and its encoder) read ``linear1.weight`` in fused eval fast paths.

    Marking the activation as neither relu nor gelu sends the layer down its plain Python path, and turning
    off nested tensors keeps ``nn.TransformerEncoder`` from reading the layer's weights directly.
    """
    guards = []
    if isinstance(unit.module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        guards.append(Assignment(unit.path, "activation_relu_or_gelu", 0))
    parts = unit.path.split(".") if unit.path else []
    for depth in range(len(parts)):
        path = ".".join(parts[:depth])
        if isinstance(model.get_submodule(path), nn.TransformerEncoder):
            guards.append(Assignment(path, "use_nested_tensor", False))
    return tuple(guards)


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
