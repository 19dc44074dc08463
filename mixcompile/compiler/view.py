"""A typed networkx view of an FX graph, the thing patterns match against.

FX nodes say *how* something is called (``call_module "mlp.c_fc"``, ``call_function gelu``); patterns
want to know *what* it is (a linear, an activation, a dropout, a product). The view gives every node a
``kind`` and keeps only data edges (a linear's weight is not an input of the FFN), so a pattern is a small
``DiGraph`` over kinds and networkx's subgraph matcher does the search.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from mixcompile.compiler.activation_names import node_activation
from mixcompile.compiler.linears import is_linear_like, linear_weights, weight_identity
from mixcompile.compiler.trace import TracedUnit
from mixcompile.types import Activation

LINEAR, ACT, DROPOUT, MUL, CHUNK, GETITEM, OTHER = (
    "linear",
    "act",
    "dropout",
    "mul",
    "chunk",
    "getitem",
    "other",
)
_MUL_FUNCTIONS = (operator.mul, torch.mul)
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_DROPOUT_FUNCTIONS = (F.dropout,)


@dataclass
class GraphView:
    """One traced unit as a ``DiGraph`` whose nodes are FX nodes with a ``kind`` attribute."""

    unit: TracedUnit
    graph: nx.DiGraph
    modules: dict[str, nn.Module] = field(repr=False)

    def kind(self, node: fx.Node) -> str:
        kind: str = self.graph.nodes[node]["kind"]
        return kind

    def activation(self, node: fx.Node) -> Activation | None:
        activation: Activation | None = self.graph.nodes[node].get("activation")
        return activation

    def dropout(self, node: fx.Node) -> tuple[float, str | None]:
        """A dropout node's probability, and the float attribute of the traced module it was read from
        (``None`` for a module's own ``p`` or a literal)."""
        attrs = self.graph.nodes[node]
        return attrs["p"], attrs["p_attr"]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def weight_param(self, node: fx.Node) -> torch.Tensor:
        """The weight tensor a linear node reads, as stored (computed, for a parametrized module)."""
        module = self.module(node)
        weight = module.weight if module is not None else attr_value(self.unit.module, node.args[1])
        return cast(torch.Tensor, weight)  # a linear node's: its module's, or the get_attr _classify checked

    def weight_keys(self, nodes: Iterable[fx.Node]) -> frozenset[int]:
        """Identities of the weights the linear ``nodes`` read: FFNs with a key in common are tied."""
        return frozenset(self._weight_key(node) for node in nodes if self.kind(node) == LINEAR)

    def linear_keys(self, nodes: Iterable[fx.Node]) -> frozenset[int]:
        """Identities of the projections themselves (the module, or a functional one's weight): one FFN
        seen in the graphs of its module and of its ancestors has the same keys."""
        return frozenset(
            id(module) if (module := self.module(node)) is not None else self._weight_key(node)
            for node in nodes
            if self.kind(node) == LINEAR
        )

    def _weight_key(self, node: fx.Node) -> int:
        module = self.module(node)
        return weight_identity(module) if module is not None else id(self.weight_param(node))

    def linear_weights(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, in], bias)`` of a linear node, from its module or its ``F.linear`` parameters."""
        module = self.module(node)
        if module is not None:
            return linear_weights(module)
        weight = cast(torch.Tensor, attr_value(self.unit.module, node.args[1])).detach()  # _classify checked
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = attr_value(self.unit.module, bias_arg) if bias_arg is not None else None
        return weight, bias.detach() if bias is not None else None

    def data_input(self, node: fx.Node) -> fx.Node | None:
        """The tensor a unary node (linear, activation, dropout, chunk, getitem) is applied to."""
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None


def build_view(unit: TracedUnit) -> GraphView:
    modules = dict(unit.module.named_modules())
    graph = nx.DiGraph()
    view = GraphView(unit, graph, modules)
    for node in unit.graph.nodes:
        graph.add_node(node, **_classify(node, modules, unit.module))
    for node in unit.graph.nodes:
        inputs = node.all_input_nodes
        if graph.nodes[node]["kind"] in (LINEAR, ACT, DROPOUT, CHUNK, GETITEM):
            first = view.data_input(node)
            inputs = [first] if first is not None else []
        for source in inputs:
            graph.add_edge(source, node)
    return view


def _classify(node: fx.Node, modules: dict[str, nn.Module], root: nn.Module) -> dict[str, object]:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if module is not None and is_linear_like(module):
            return {"kind": LINEAR}
        if isinstance(module, nn.Dropout):
            return {"kind": DROPOUT, "p": float(module.p), "p_attr": None}
        if isinstance(module, nn.Identity):  # a pass-through (timm's norm=Identity): a dropout of p = 0
            return {"kind": DROPOUT, "p": 0.0, "p_attr": None}
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS and _has_param_weight(node, root):
        return {"kind": LINEAR}
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        if isinstance(p, float | int):  # a probability computed in the graph is not a dropout we can move
            return {"kind": DROPOUT, "p": float(p), "p_attr": getattr(p, "attr", None)}
    if _is_mul(node):
        return {"kind": MUL}
    if _is_chunk(node):
        return {"kind": CHUNK}
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        return {"kind": GETITEM, "index": node.args[1]}
    activation = node_activation(node, modules)
    if activation is not None:
        return {"kind": ACT, "activation": activation}
    return {"kind": OTHER}


def dropout_training(node: fx.Node) -> object:
    """The ``training`` argument of an ``F.dropout`` node as the graph holds it: a constant or a node
    (``F.dropout``'s default is ``True``, dropping in eval mode too)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)


def _is_mul(node: fx.Node) -> bool:
    binary = len(node.args) == 2 and not node.kwargs
    if node.op == "call_function" and node.target in _MUL_FUNCTIONS:
        return binary and all(isinstance(arg, fx.Node) for arg in node.args)
    return node.op == "call_method" and node.target == "mul" and binary and isinstance(node.args[1], fx.Node)


def _is_chunk(node: fx.Node) -> bool:
    """``t.chunk(2, dim=-1)`` / ``torch.chunk(t, 2, -1)``: the fused gate-up split of Phi-3 and friends."""
    is_call = (node.op == "call_method" and node.target == "chunk") or (
        node.op == "call_function" and node.target is torch.chunk
    )
    if not is_call or len(node.args) < 2 or node.args[1] != 2:
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return bool(dim == -1)


def _has_param_weight(node: fx.Node, root: nn.Module) -> bool:
    """A functional linear counts only when its weight is a 2-D tensor attribute of the traced module."""
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node) or node.args[1].op != "get_attr":
        return False
    value = attr_value(root, node.args[1])
    return isinstance(value, torch.Tensor) and value.dim() == 2


def attr_value(root: nn.Module, arg: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node refers to, or ``None`` for anything else."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value: object = root
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None
