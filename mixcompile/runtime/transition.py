"""Transition tuning: make a trained Mixture-of-Tokens model usable one sequence at a time.

A MoT block mixes tokens *across sequences*, so it needs a batch of ``G`` sequences. With fewer, its
``small_batch`` policies do not help at batch 1: a lone sequence is its own group, so every expert takes it
with weight 1 (``"group"`` and ``"sparse"`` then compute the same thing, the sum of *all* experts), a
function the model never saw in training, at ``G`` times the FFN FLOPs per token of a full group.

Antoniak et al. 2023 (arXiv 2310.15961, v2) answer this with *transition tuning*: a MoT model trained for
150K steps becomes a sparse Token Choice MoE initialised from the MoT weights (experts as they are, the
MoT controller as the router) and trains on for 15K more steps (10%); the loss jumps at the switch, then
recovers. :func:`to_token_choice` is that switch; continue training the returned model as usual.

The authors' earlier write-up (the llm-random blog post "Mixture of Tokens", 2023-10-06) proposed
*temperature annealing* instead: lower the controller's softmax temperature so each expert's mix
concentrates on one token (``tau -> 0`` is expert choice within the group, ``MoTBlock(mode="sparse")``).
That removes mixing inside a group of ``G``, but not the need for one: at batch 1 the group is still the
lone sequence. :func:`temperature_schedule` and :func:`set_mot_temperature` implement the annealing, for
that use (no mixing at batch ``G``) and for comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from mixcompile.errors import ConfigError, check_number, check_positive_int
from mixcompile.runtime.blocks import MoEBlock, MoTBlock
from mixcompile.runtime.calls import replace_in_forward_scopes
from mixcompile.runtime.mixing import MIN_TEMPERATURE, read_only_temperature
from mixcompile.runtime.rewritten import carry_keyword_hooks


def to_token_choice(model: nn.Module, *, top_k: int | None = None) -> list[str]:
    """Replace every :class:`MoTBlock` of ``model`` (in place) by a Token Choice :class:`MoEBlock` holding
    the same experts, with the MoT controller as its router; returns the paths replaced.

    ``top_k`` defaults to ``E / G``: a MoT group of ``G`` tokens runs all ``E`` experts once, so ``E / G``
    experts per token keep the FFN FLOPs per token unchanged (and the same parameters). Without ``top_k``,
    ``E`` must be a multiple of ``G`` and at least ``2G`` (a top-1 router's renormalised weight is 1, so its
    gate would learn from the balancing loss alone): otherwise this refuses and asks for ``top_k``. The
    router is the built-in ``topk`` with its default balancing and z losses (add ``mixcompile.aux_loss`` to
    the loss). The block holds the MoT block's own expert and controller parameters (not copies), so an
    optimizer built before the switch keeps training them. Expert weights are kept unscaled: on a trained
    model (``cpu-long`` in ``examples/train_lm.py``) scaling the outputs by ``top_k``, to match a token's
    MoT weights (which sum to ``E / G`` on average), started further from the MoT loss. The router scores
    with the controller's weights at temperature 1: a temperature the MoT mixer was annealed to (see
    :func:`set_mot_temperature`) is not carried over (it scaled a softmax over a group's members, not over
    experts). The result no longer mixes sequences, so its output for a sequence does not depend on the
    batch.

    Call it on the converted model itself (what ``convert`` returned): its forward's scope then lists the
    new blocks, so a block the forward calls several times adds up its router losses (see
    :mod:`mixcompile.runtime.calls`).

    ``mixcompile.save`` and ``save_pretrained`` of the result record the switch (each new block's
    ``token_choice`` setting), and loading replays it after the recipes, before the weights are read.
    """
    _check_module("to_token_choice", model)
    if isinstance(model, MoTBlock):
        raise ConfigError("to_token_choice: the model is itself a MoTBlock; pass the model that holds it.")
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, MoTBlock)]
    if not blocks:
        raise ConfigError("to_token_choice: the model has no MoTBlock.")
    plans = [(path, mot, _router_top_k(path, mot, top_k)) for path, mot in blocks]  # check all, then swap
    for path, mot, k in plans:
        _replace(model, path, _token_choice_block(mot, k))
    return [path for path, _ in blocks]


def redo_token_choice(model: nn.Module, path: str, top_k: int) -> None:
    """Make the MoT block at ``path`` the Token Choice block :func:`to_token_choice` made of it with
    ``top_k`` (a load replaying a saved switch; the weights are read afterwards)."""
    try:
        mot = model.get_submodule(path)
    except AttributeError:
        mot = None
    if not isinstance(mot, MoTBlock):
        found = "nothing" if mot is None else f"a {type(mot).__name__}"
        raise ConfigError(f"a Token Choice switch is recorded at {path!r}, but the model has {found} there.")
    _replace(model, path, _token_choice_block(mot, _router_top_k(path, mot, top_k)))


def _replace(model: nn.Module, path: str, block: MoEBlock) -> None:
    """Put ``block`` wherever the module at ``path`` is registered (a block shared by layers stays shared),
    with the keyword hook that lets it take its input by the FFN's name."""
    old = model.get_submodule(path)
    carry_keyword_hooks(old, block)
    replace_in_forward_scopes(model, old, block)
    for where, module in list(model.named_modules(remove_duplicate=False)):
        if module is old:
            parent_path, _, name = where.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, name, block)


def _router_top_k(path: str, mot: MoTBlock, top_k: int | None) -> int:
    controller = getattr(mot.mixer, "controller", None)
    if not isinstance(controller, nn.Linear) or controller.bias is not None:
        raise ConfigError(f"to_token_choice: the mixer at {path!r} has no bias-free linear controller.")
    experts, group = mot.experts.num_experts, mot.group_size
    if top_k is None:
        if experts % group or experts < 2 * group:
            why = (
                "is not a whole number, so no top_k keeps the FLOPs per token"
                if experts % group
                else "would be a top-1 router, whose renormalised weight is always 1 (its gate would learn "
                "from the balancing loss alone)"
            )
            raise ConfigError(
                f"to_token_choice: the block at {path!r} has E={experts} experts and groups of G={group}; "
                f"top_k defaults to E/G = {experts / group:g}, which {why}. Pass top_k= explicitly."
            )
        top_k = experts // group
    return check_positive_int("top_k", top_k, maximum=experts)


def _token_choice_block(mot: MoTBlock, k: int) -> MoEBlock:
    experts = mot.experts
    moe = MoEBlock(
        experts.d_model,
        experts.d_hidden,
        experts.num_experts,
        top_k=k,
        activation=experts.activation,
        gated=experts.gated,
        bias=experts.bias,
        hidden_dropout=experts.hidden_dropout,
        kernel=mot.recipe_kernel,  # what a load's replay builds it with; the kernel set since follows
        site=mot.site,
        device=experts.w_in.device,
        dtype=experts.w_in.dtype,
    )
    # The same parameter objects, not copies: an optimizer built before the switch keeps training them.
    moe.experts = experts
    moe.router.gate.weight = mot.mixer.controller.weight
    moe.from_mot = True
    moe.kernel = mot.kernel
    return moe.train(mot.training)


def temperature_schedule(step: int, steps: int, *, start: float = 1.0, end: float = 0.01) -> float:
    """Geometric annealing from ``start`` (at step 0) to ``end`` (at ``steps`` and after): the temperature
    falls by the same factor every step, so each halving of it gets as many steps as the last. Both are
    temperatures, held to :func:`set_mot_temperature`'s range (finite, at least ``1e-6``)."""
    check_positive_int("steps", steps)
    check_positive_int("step", step, minimum=0)
    start = check_number("start", start, minimum=MIN_TEMPERATURE)
    end = check_number("end", end, minimum=MIN_TEMPERATURE)
    fraction = min(step, steps) / steps
    return float(start * (end / start) ** fraction)


def set_mot_temperature(model: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every MoT block's mixer; returns how many were set. Works for any
    mixer with a ``temperature`` attribute, as the built-in ``softmax`` mixer has. ``temperature`` is finite
    and at least ``MIN_TEMPERATURE`` (1e-6), where a softmax's scaled scores still fit a float."""
    _check_module("set_mot_temperature", model)
    temperature = check_number("temperature", temperature, minimum=MIN_TEMPERATURE)
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, MoTBlock)]
    for path, block in blocks:  # check every mixer before changing any
        if not hasattr(block.mixer, "temperature"):
            raise ConfigError(f"the mixer at {path!r} ({block.mixer_name!r}) has no temperature.")
        if read_only_temperature(block.mixer):
            raise ConfigError(
                f"the mixer at {path!r} ({block.mixer_name!r}) computes its temperature itself (a read-only "
                "property): there is none to set."
            )
        current = block.mixer.temperature
        if isinstance(current, torch.Tensor) and not current.is_floating_point():
            raise ConfigError(
                f"the mixer at {path!r} ({block.mixer_name!r}) keeps its temperature in a {current.dtype} "
                "tensor, which cannot hold a fractional temperature."
            )
    for _, block in blocks:
        current = block.mixer.temperature
        if isinstance(current, torch.Tensor):  # a buffer or parameter (saved with the weights): in place
            with torch.no_grad():
                current.fill_(temperature)
        else:
            block.mixer.temperature = temperature
    return len(blocks)


def _check_module(function: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function} takes the converted torch.nn.Module, got {type(model).__name__}.")
