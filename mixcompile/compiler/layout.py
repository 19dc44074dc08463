"""The token layout of each FFN input, decided at conversion time, so a MoT block groups the right axis.

A MoT block mixes tokens across sequences, so it must know which axis of its input is the batch:
``[B, T, d]`` (most models), ``[T, B, d]`` (``nn.Transformer`` without ``batch_first``, XLNet) or the
flattened ``[B*T, d]`` of OPT-style layers, whose ``B`` comes from the model's forward
(:mod:`mixcompile.runtime.tokens`). Three witnesses, strongest first:

1. **observed**: the FFN input in a real forward of the model's inputs (the user's ``example_inputs``, or
   inputs built from a Hugging Face config), compared with the batch size of those inputs;
2. **the graph**: ``nn.Transformer*`` layers declare ``batch_first``; a ``reshape(-1, d)`` before the FFN
   flattens it (:func:`mixcompile.compiler.find.static_layout`);
3. **the recipe**: ``layout=`` states it where the model does not say.

A recipe that contradicts what the model shows is an error naming the site; with no witness at all the
input is taken as batch-first, with a warning naming the site (a sequence-first model converted that way
would mix tokens across positions).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixcompile.compiler.find import FFNSite
from mixcompile.compiler.probe import example_inputs
from mixcompile.compiler.recipe import Recipe
from mixcompile.errors import ConfigError, warn
from mixcompile.runtime.tokens import covered_by_token_hooks
from mixcompile.types import TokenLayout

_BATCH_KEYS = ("input_ids", "attention_mask", "inputs_embeds", "pixel_values", "decoder_input_ids")
AUTO_BATCH, AUTO_SEQ = 3, 5  # different sizes, so [B, T, d] and [T, B, d] tell themselves apart


def auto_inputs(model: nn.Module) -> dict[str, Any] | None:
    """Inputs built from the model itself (a Hugging Face config, or mixcompile's tiny GPT), with an
    attention mask that pads the last sequence's last position where the model takes one; ``None`` for a
    model that does not say what it takes."""
    try:
        inputs = example_inputs(model, batch=AUTO_BATCH, seq=AUTO_SEQ)
    except ConfigError:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {key: value.to(device) for key, value in inputs.items()}
    ids = inputs.get("input_ids")
    if ids is not None and "attention_mask" in _parameters(model):
        mask = torch.ones_like(ids)
        mask[-1, -1] = 0
        inputs["attention_mask"] = mask
    return inputs


def batch_size(inputs: Any) -> int | None:
    """The batch size of a model's keyword inputs, where a Hugging Face-style name says which is which."""
    if isinstance(inputs, Mapping):
        for key in _BATCH_KEYS:
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return int(value.shape[0])
    return None


def observed_layout(shape: tuple[int, ...], batch: int | None) -> TokenLayout | None:
    """The layout an FFN input of ``shape`` shows in a forward of ``batch`` sequences (``None``: unclear)."""
    if len(shape) == 2:
        return "flat"
    if len(shape) != 3 or batch is None:
        return None
    if shape[0] == batch and shape[1] != batch:
        return "batch_first"
    if shape[1] == batch and shape[0] != batch:
        return "seq_first"
    return None


def decide_layout(
    site: FFNSite, recipe: Recipe, observed: TokenLayout | None, model: nn.Module
) -> TokenLayout:
    """The layout of ``site``'s MoT block; a contradiction, or flattened tokens whose batch size nothing in
    the model's forward records, is a :class:`ConfigError` naming the site."""
    stated = None if recipe.layout == "auto" else recipe.layout
    where = f"FFN site {site.index} at {site.label!r}"
    layout = None
    for witness, value in (("a forward of the model's inputs", observed), ("the model's graph", site.layout)):
        if value is None:
            continue
        if stated is not None and stated != value:
            raise ConfigError(
                f"{where}: the recipe says layout={stated!r}, but {witness} shows {value!r}; leave "
                "layout='auto' or state the layout the model has."
            )
        layout = value
        break
    layout = layout or stated
    if layout is None:
        warn(
            f"{where}: nothing says which axis of its FFN input is the batch (no nn.Transformer* layer, no "
            "keyword example input such as input_ids=); taken as batch-first [B, T, d]. A sequence-first "
            f"model converted so would mix tokens across positions{_attention_hint(model, site.path)}: pass "
            "layout='batch_first' or 'seq_first' to state it.",
        )
        layout = "batch_first"
    if layout == "flat" and stated != "flat" and not covered_by_token_hooks(model, site.path):
        raise ConfigError(
            f"{where}: its FFN sees flattened [B*T, d] tokens, and no module above it takes the model's "
            "inputs (input_ids or inputs_embeds with an attention_mask) to say how many sequences B there "
            "are. Use strategy='moe' for it, or call the model inside `with mixcompile.token_mask(model, "
            "mask)` and convert with layout='flat'."
        )
    return layout


def _attention_hint(model: nn.Module, path: str) -> str:
    """A hint, never a witness: an ``nn.MultiheadAttention`` in the FFN's layer takes ``[T, B, d]`` by
    default, and batch-first models often transpose around it."""
    parent = path.rpartition(".")[0]
    for owner in dict.fromkeys((path, parent)):
        flags = {
            m.batch_first
            for m in model.get_submodule(owner).modules()
            if isinstance(m, nn.MultiheadAttention)
        }
        if flags:
            return (
                " (the nn.MultiheadAttention in its layer is sequence-first; unless the layer transposes "
                "around it, so is the FFN)"
                if flags == {False}
                else ""
            )
    return ""


def _parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return set()
