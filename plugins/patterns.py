"""Built-in FFN patterns the compiler looks for.

- ``mlp``: ``down(act(up(x)))``, optionally with up to two pass-through modules on the hidden activations
  (a dropout; timm's ``drop1`` then ``norm=Identity``) (GPT-2, BERT, T5 v1.0, ViT, timm, nanoGPT,
  ``nn.TransformerEncoderLayer``).
- ``gated_mlp``: ``down(act(gate(x)) * up(x))`` (LLaMA, Mistral, Qwen2, T5 v1.1 gated-gelu).
- ``fused_gated_mlp``: one ``gate_up`` projection split with ``chunk(2, dim=-1)`` (Phi-3).

Biases are optional everywhere; activations are whatever the graph view normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeAlias, cast

import networkx as nx
import torch
from torch import fx

from mixcompile import Activation, DenseFFN, PatternRegister, hookimpl
from mixcompile.compiler import (
    ACT,
    ANY,
    CHUNK,
    DROPOUT,
    GETITEM,
    INPUT,
    LINEAR,
    MUL,
    GraphView,
    TemplatePattern,
    chain,
    template,
)

LinearWeights: TypeAlias = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias or None)


def _with_optional_dropout(build: Callable[[int], nx.DiGraph]) -> list[nx.DiGraph]:
    """Templates with 0, 1 and 2 dropout-kind nodes (dropouts, identities) between the projections."""
    return [build(count) for count in range(3)]


def _ffn(
    view: GraphView, act: fx.Node, up: LinearWeights, down: fx.Node, gate: LinearWeights | None = None
) -> DenseFFN | None:
    """A DenseFFN from ``(weight, bias)`` pairs, or ``None`` when the shapes do not chain."""
    w_out, b_out = view.linear_weights(down)
    (w_in, b_in), (w_gate, b_gate) = up, gate or (None, None)
    h, d = w_in.shape
    if w_out.shape != (d, h) or (w_gate is not None and w_gate.shape != (h, d)):
        return None
    activation = cast(Activation, view.activation(act))  # an activation node always has its activation's name
    return DenseFFN(w_in, w_out, activation, w_gate=w_gate, b_in=b_in, b_gate=b_gate, b_out=b_out)


def _into_down(kinds: dict[str, str], edges: list[tuple[str, str]], dropouts: int) -> nx.DiGraph:
    """Close a gated template: the product feeds the down projection, through ``dropouts`` pass-throughs."""
    chain_roles = ["mul", *(f"drop{i}" for i in range(dropouts)), "down"]
    kinds = {**kinds, **{f"drop{i}": DROPOUT for i in range(dropouts)}}
    edges = [*edges, *zip(chain_roles, chain_roles[1:], strict=False)]
    return template(*edges, kinds=kinds)


class MLP(TemplatePattern):
    name = "mlp"

    def templates(self) -> list[nx.DiGraph]:
        def build(dropouts: int) -> nx.DiGraph:
            middle = [(f"drop{i}", DROPOUT) for i in range(dropouts)]
            return chain(("up", LINEAR), ("act", ACT), *middle, ("down", LINEAR))

        return _with_optional_dropout(build)

    def to_ffn(self, roles: Mapping[str, fx.Node], view: GraphView) -> DenseFFN | None:
        return _ffn(view, roles["act"], view.linear_weights(roles["up"]), roles["down"])


class GatedMLP(TemplatePattern):
    name = "gated_mlp"

    def templates(self) -> list[nx.DiGraph]:
        def build(dropouts: int) -> nx.DiGraph:
            kinds = {INPUT: ANY, "gate": LINEAR, "up": LINEAR, "act": ACT, "mul": MUL, "down": LINEAR}
            edges = [(INPUT, "gate"), (INPUT, "up"), ("gate", "act"), ("act", "mul"), ("up", "mul")]
            return _into_down(kinds, edges, dropouts)

        return _with_optional_dropout(build)

    def to_ffn(self, roles: Mapping[str, fx.Node], view: GraphView) -> DenseFFN | None:
        gate = view.linear_weights(roles["gate"])
        return _ffn(view, roles["act"], view.linear_weights(roles["up"]), roles["down"], gate=gate)


class FusedGatedMLP(TemplatePattern):
    name = "fused_gated_mlp"

    def templates(self) -> list[nx.DiGraph]:
        def build(dropouts: int) -> nx.DiGraph:
            kinds = {
                INPUT: ANY,
                "gate_up": LINEAR,
                "chunk": CHUNK,
                "gate_half": GETITEM,
                "up_half": GETITEM,
                "act": ACT,
                "mul": MUL,
                "down": LINEAR,
            }
            edges = [
                (INPUT, "gate_up"),
                ("gate_up", "chunk"),
                ("chunk", "gate_half"),
                ("chunk", "up_half"),
                ("gate_half", "act"),
                ("act", "mul"),
                ("up_half", "mul"),
            ]
            return _into_down(kinds, edges, dropouts)

        return _with_optional_dropout(build)

    def to_ffn(self, roles: Mapping[str, fx.Node], view: GraphView) -> DenseFFN | None:
        gate_index, up_index = roles["gate_half"].args[1], roles["up_half"].args[1]
        if {gate_index, up_index} != {0, 1}:
            return None
        weight, bias = view.linear_weights(roles["gate_up"])
        if weight.shape[0] % 2:
            return None
        h = weight.shape[0] // 2
        halves = [(weight[:h], bias[:h] if bias is not None else None)]
        halves.append((weight[h:], bias[h:] if bias is not None else None))
        up, gate = halves[cast(int, up_index)], halves[cast(int, gate_index)]  # 0 and 1, checked above
        return _ffn(view, roles["act"], up, roles["down"], gate=gate)


@hookimpl
def register_patterns(register: PatternRegister) -> None:
    register("mlp", MLP, description="down(act(up(x))), optional hidden dropout, with or without biases")
    register("gated_mlp", GatedMLP, description="down(act(gate(x)) * up(x)) (LLaMA, Mistral, Qwen2, T5 v1.1)")
    register("fused_gated_mlp", FusedGatedMLP, description="gate_up(x).chunk(2, dim=-1), then gated (Phi-3)")
