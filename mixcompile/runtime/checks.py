"""Checks of what plugins return, made on every call, so a bad plan or output names its plugin and site
instead of surfacing later as a torch error deep inside a kernel.

Three levels, by cost:

- **structure** (types, shapes, dtypes): read from tensor metadata, free; every call, compiled or not.
- **ranges** (routing indices within the block's tokens and experts): one reduction and one read back to
  the host per call; every eager call (a compiled graph or a CUDA-graph capture skips it: reading back
  would break the graph, or the capture).
  ``benchmarks/bench_checks.py`` measures what it costs.
- **values** (NaN / inf in inputs, plans and outputs; a token routed to an expert twice): a full pass over
  each tensor and a sort, so only under the debug switch: ``MIXCOMPILE_DEBUG_CHECKS=1`` or
  :func:`mixcompile.debug_checks`. A NaN in a block's *input* is then reported as coming from upstream,
  not blamed on the router that received it.

A forward on the meta device (shape inference) has no values to read: it gets the structure checks only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from mixcompile.errors import PluginError, ShapeError
from mixcompile.plugins.build import Source, source_text
from mixcompile.runtime.mixing import MixPlan
from mixcompile.runtime.routing import RoutingPlan

_debug = os.environ.get("MIXCOMPILE_DEBUG_CHECKS", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Turn the value checks (NaN / inf, duplicate routing pairs) on for the body (or off)."""
    global _debug
    previous, _debug = _debug, enabled
    try:
        yield
    finally:
        _debug = previous


def debug_checks_enabled() -> bool:
    return _debug and not torch.compiler.is_compiling() and not _capturing()


def _capturing() -> bool:
    """Whether a CUDA graph is being captured, where reading a value back to the host is not allowed (the
    H100 run of the CUDA-graph test found the range check doing just that)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _can_read_back() -> bool:
    """Value checks read back to the host: not while tracing (a graph break) nor capturing a CUDA graph."""
    return not torch.compiler.is_compiling() and not _capturing()


def check_picks(experts: torch.Tensor, num_experts: int, kernel: Source) -> None:
    """A third-party kernel's top-k picks in ``[0, num_experts)``, checked where they are made so that the
    kernel is named (one read back; a plan listing them is not read back again)."""
    if not _can_read_back() or experts.is_meta or experts.numel() == 0:
        return
    low, high = torch.aminmax(experts)
    if bool((low < 0) | (high >= num_experts)):
        raise PluginError(
            f"{source_text(kernel)}: topk_routing returned experts from {int(low)} to {int(high)}; expected "
            f"indices in [0, {num_experts})."
        )


def check_input(x: torch.Tensor, where: Source) -> None:
    """Debug switch: a non-finite block input is upstream's fault, said before any plugin sees it."""
    if debug_checks_enabled() and not x.is_meta and not torch.isfinite(x).all():
        raise ShapeError(
            f"the input of {source_text(where)} has NaN or inf: it comes from the layers before the block, "
            "not from the block's plugins."
        )


def check_routing_plan(
    plan: object, *, source: Source, num_tokens: int, num_experts: int, in_range: bool = False
) -> RoutingPlan:
    """A router's plan: structure always, index ranges (and the order ``pairs_per_token`` declares) in eager
    forwards unless the caller knows them (``in_range``: a kernel's own picks), values under the debug
    switch."""

    def fail(what: str) -> PluginError:
        return PluginError(f"{source_text(source)} returned a malformed RoutingPlan: {what}.")

    if not isinstance(plan, RoutingPlan):
        raise fail(f"expected a mixcompile.RoutingPlan, got {type(plan).__name__}")
    if plan.num_tokens != num_tokens or plan.num_experts != num_experts:
        raise fail(
            f"it describes {plan.num_tokens} tokens x {plan.num_experts} experts, "
            f"the block has {num_tokens} x {num_experts}"
        )
    fields = {"token_index": plan.token_index, "expert_index": plan.expert_index, "weight": plan.weight}
    for name, tensor in fields.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
            raise fail(f"{name} must be a 1-D tensor")
    if not plan.token_index.shape[0] == plan.expert_index.shape[0] == plan.weight.shape[0]:
        raise fail("token_index, expert_index and weight differ in length")
    for name in ("token_index", "expert_index"):
        if fields[name].dtype != torch.int64:
            raise fail(f"{name} must be int64, got {fields[name].dtype}")
    if not plan.weight.is_floating_point():
        raise fail(f"weight must be floating point, got {plan.weight.dtype}")
    _check_plan_extras(plan, fail, num_tokens, num_experts)
    k = plan.pairs_per_token
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise fail(f"pairs_per_token must be a positive int or None, got {k!r}")
        if plan.token_index.shape[0] != num_tokens * k:
            raise fail(
                f"pairs_per_token={k} with {num_tokens} tokens means {num_tokens * k} pairs, "
                f"got {plan.token_index.shape[0]} (leave it None when pairs are dropped)"
            )
    debug = debug_checks_enabled()
    if (
        not _can_read_back()
        or plan.token_index.is_meta
        or plan.token_index.numel() == 0
        or (in_range and not debug)
    ):
        return plan
    tokens, experts = plan.token_index, plan.expert_index
    # Few ops, as every eager forward pays for them: one min-max pass per index tensor, and none over the
    # tokens of a plan with pairs_per_token, whose order check bounds them. The diagnosis is for failures.
    low, high = torch.aminmax(experts)
    wrong = (low < 0) | (high >= num_experts)
    if k is not None:
        wrong |= (tokens != torch.arange(tokens.shape[0], device=tokens.device) // k).any()
    else:
        low, high = torch.aminmax(tokens)
        wrong |= (low < 0) | (high >= num_tokens)
    if bool(wrong):  # the one read back per call
        out_of_range = (tokens.min() < 0) | (tokens.max() >= num_tokens) | (experts.min() < 0)
        if k is None or bool(out_of_range | (experts.max() >= num_experts)):
            raise fail(f"token_index outside [0, {num_tokens}) or expert_index outside [0, {num_experts})")
        raise fail(
            f"pairs_per_token={k} says token t's pairs are pairs t*{k} to t*{k}+{k - 1}, but token_index "
            "is not arange(num_tokens).repeat_interleave(pairs_per_token); leave it None for other orders"
        )
    if debug:
        if not torch.isfinite(plan.weight).all():
            raise fail("weight has NaN or inf")
        pairs = tokens * num_experts + experts
        if torch.unique(pairs).numel() != pairs.numel():
            raise fail("a token is routed to the same expert twice")
    return plan


def _check_plan_extras(
    plan: RoutingPlan, fail: Callable[[str], PluginError], num_tokens: int, num_experts: int
) -> None:
    """``probs`` and ``aux_losses``, from tensor metadata only (the block computes statistics from the one
    and the training loss from the other, where a wrong type would fail naming no plugin)."""
    probs = plan.probs
    if probs is not None:
        if not isinstance(probs, torch.Tensor):
            raise fail(
                f"probs must be a tensor [{num_tokens}, {num_experts}] or None, got {type(probs).__name__}"
            )
        if tuple(probs.shape) != (num_tokens, num_experts):
            raise fail(
                f"probs has shape {tuple(probs.shape)}, expected [{num_tokens}, {num_experts}] "
                "(tokens x experts)"
            )
        if not probs.is_floating_point():
            raise fail(f"probs must be floating point, got {probs.dtype}")
    losses = plan.aux_losses
    if not isinstance(losses, dict):
        raise fail(f"aux_losses must be a dict of name -> scalar tensor, got {type(losses).__name__}")
    for name, loss in losses.items():
        if not isinstance(name, str):
            raise fail(f"aux_losses keys must be strings (the loss names), got {name!r}")
        if not isinstance(loss, torch.Tensor):
            raise fail(
                f"aux_losses[{name!r}] is a {type(loss).__name__}, expected a 0-dim floating tensor (a loss "
                "that trains the router must be a tensor computed from its parameters)"
            )
        if loss.ndim != 0 or not loss.is_floating_point():
            raise fail(
                f"aux_losses[{name!r}] has shape {tuple(loss.shape)} and dtype {loss.dtype}, expected a "
                "0-dim floating tensor (reduce it to a scalar, e.g. with .mean())"
            )


def check_mix_plan(
    plan: object, *, source: Source, shape: tuple[int, ...], present: torch.Tensor | None = None
) -> MixPlan:
    """A mixer's plan: shapes always, values under the debug switch. With ``present`` (the mask the mixer
    was given, ``[T or 1, n, G]``), the debug switch also checks that absent members have weight 0."""
    if not isinstance(plan, MixPlan):
        raise PluginError(
            f"{source_text(source)} returned {type(plan).__name__}, expected a mixcompile.MixPlan."
        )
    for name in ("merge", "emit"):
        tensor = getattr(plan, name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PluginError(
                f"{source_text(source)} returned MixPlan.{name} of shape {got}, expected {shape} "
                "[T, n, G, E]."
            )
        if not tensor.is_floating_point():
            raise PluginError(
                f"{source_text(source)} returned MixPlan.{name} of dtype {tensor.dtype}, expected floating "
                "point."
            )
        if debug_checks_enabled() and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise PluginError(f"{source_text(source)} returned MixPlan.{name} with NaN or inf.")
    if present is not None and not present.is_meta and debug_checks_enabled():
        absent = ~present.bool().unsqueeze(-1)  # [T or 1, n, G, 1]
        for name in ("merge", "emit"):
            tensor = getattr(plan, name)
            if bool((tensor.masked_fill(~absent, 0) != 0).any()):
                raise PluginError(
                    f"{source_text(source)} returned MixPlan.{name} with weight on absent group members "
                    "(present=False: the missing members of an incomplete last group, and padding tokens): "
                    "they must get weight 0 in merge and emit and take no part in any normalisation, or "
                    "padding changes real tokens' outputs. Mask with `present`, e.g. "
                    "logits.masked_fill(~present[..., None], -inf) before a softmax over the group, then "
                    "* present[..., None] (a position may have no member present)."
                )
    return plan


def check_output(y: object, like: torch.Tensor, source: Source) -> torch.Tensor:
    """A kernel's output: shape and dtype of ``like`` always, finite under the debug switch."""
    if not isinstance(y, torch.Tensor) or y.shape != like.shape or y.dtype != like.dtype:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise PluginError(f"{source_text(source)} returned {got}, expected {tuple(like.shape)} {like.dtype}.")
    if debug_checks_enabled() and not y.is_meta and not torch.isfinite(y).all():
        raise PluginError(f"{source_text(source)} returned NaN or inf from finite inputs.")
    return y
