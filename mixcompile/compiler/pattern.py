"""What an FFN pattern is, and the template matcher the built-in ones share.

A pattern is anything with a ``name`` and a ``find(view)`` that yields :class:`Match` es; patterns are
plugins (``register_patterns`` hook), so a third party can add FFN shapes we do not know. Most patterns
are a small ``DiGraph`` over node kinds (``linear``, ``act``, ``mul``, ...) plus a function that reads the
weights: subclass :class:`TemplatePattern` for that. The matcher, not each pattern, enforces the rule that
makes a match replaceable: no inner node may feed anything outside the match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import networkx as nx
from networkx.algorithms import isomorphism
from torch import fx

from mixcompile.compiler.view import GraphView
from mixcompile.runtime.ffn import DenseFFN

ANY = "any"  # template kind matching every node (the FFN input)
INPUT = "x"  # the template role of the FFN input


@dataclass(frozen=True)
class Match:
    """An FFN found in one graph: its nodes by role, its input and output node, its canonical weights."""

    pattern: str
    roles: Mapping[str, fx.Node]
    input: fx.Node
    output: fx.Node
    ffn: DenseFFN

    @property
    def nodes(self) -> frozenset[fx.Node]:
        """The FFN's own nodes (its input excluded)."""
        return frozenset(node for role, node in self.roles.items() if role != INPUT)


@runtime_checkable
class Pattern(Protocol):
    name: str

    def find(self, view: GraphView) -> Iterable[Match]: ...


class TemplatePattern(ABC):
    """A pattern given as ``DiGraph`` templates (nodes are roles with a ``kind``; role ``"x"`` is the input).

    ``output_role`` names the node whose value the FFN returns; :meth:`to_ffn` reads the weights of a
    candidate mapping and returns ``None`` to reject it (wrong shapes, wrong chunk order, ...).
    """

    name: str = ""
    output_role: str = "down"

    @abstractmethod
    def templates(self) -> list[nx.DiGraph]: ...

    @abstractmethod
    def to_ffn(self, roles: Mapping[str, fx.Node], view: GraphView) -> DenseFFN | None: ...

    def find(self, view: GraphView) -> Iterator[Match]:
        seen: set[frozenset[fx.Node]] = set()
        for template in self.templates():
            matcher = isomorphism.DiGraphMatcher(view.graph, template, node_match=_same_kind)
            for mapping in matcher.subgraph_monomorphisms_iter():
                roles = {role: node for node, role in mapping.items()}
                key = frozenset(mapping)
                if key in seen or not _closed(roles, self.output_role):
                    continue
                seen.add(key)
                ffn = self.to_ffn(roles, view)
                if ffn is not None:
                    yield Match(self.name, roles, roles[INPUT], roles[self.output_role], ffn)


def template(*edges: tuple[str, str], kinds: Mapping[str, str]) -> nx.DiGraph:
    """Build a template from ``(producer, consumer)`` role edges and each role's kind."""
    graph = nx.DiGraph()
    for role, kind in kinds.items():
        graph.add_node(role, kind=kind)
    graph.add_edges_from(edges)
    return graph


def chain(*roles: tuple[str, str]) -> nx.DiGraph:
    """A straight template ``x -> roles[0] -> roles[1] -> ...`` from ``(role, kind)`` pairs."""
    names = [INPUT] + [role for role, _ in roles]
    kinds = {INPUT: ANY, **dict(roles)}
    return template(*zip(names, names[1:], strict=False), kinds=kinds)


def _same_kind(graph_attrs: Mapping[str, object], template_attrs: Mapping[str, object]) -> bool:
    return template_attrs["kind"] == ANY or graph_attrs["kind"] == template_attrs["kind"]


def _closed(roles: Mapping[str, fx.Node], output_role: str) -> bool:
    """Inner nodes (all but input and output) may only feed nodes of the match."""
    inside = set(roles.values())
    return all(set(node.users) <= inside for role, node in roles.items() if role not in (INPUT, output_role))
