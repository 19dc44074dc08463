"""``torch.library`` custom ops around the fused kernels, so ``torch.compile`` sees one opaque node per call.

Each block call is a forward op that also returns what its backward needs (pre-activations; for MoE the
pairs sorted by expert, so backward does not sort again; for MoT the experts' outputs), and a backward op;
``register_autograd`` links them and ``register_fake`` gives shapes. Ops cannot return optional tensors, so
absent ones travel as empty tensors. Below the op boundary the expert tensors travel as one ``ExpertTensors``.

Eager calls skip the op's dispatch: the same functions and autograd formulas run as an
``autograd.Function``. Each op call costs about 25 us of host time (its Python layers for autograd, the
backend and dynamo's guard; measured on this project's 2-core CPU machine with the launches stubbed out: a
routed MoE forward, two ops, took 320-370 us eagerly against 375-415 us through the ops), and at decode
sizes host time is the step time. Inference calls (nothing requires grad, or no grad mode) skip the
``autograd.Function`` as well: about 60 us less for a routed decode forward on the same machine.
"""

import contextlib
from collections.abc import Callable

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mixcompile import ConfigError, ExpertTensors, MixPlan, RoutingPlan, StackedExperts
from mixcompile_plugins.triton.moe_kernels import moe_backward, moe_forward, route, unpack
from mixcompile_plugins.triton.mot_kernels import mot_backward, mot_forward
from mixcompile_plugins.triton.routing_kernels import topk_route, topk_route_backward
from mixcompile_plugins.triton.sorting import packed_size

Tensor = torch.Tensor


def _device(x: Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _gate(pre_gate: Tensor, w_gate: Tensor | None) -> Tensor | None:
    """The saved gate pre-activations of gated experts, ``None`` for plain ones: decided by the weight, as an
    empty batch saves an empty tensor either way (and a gated one still owes its gate a zero gradient)."""
    return None if w_gate is None else pre_gate


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _packed(
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    b_in: Tensor | None,
    b_gate: Tensor | None,
    b_out: Tensor | None,
) -> ExpertTensors:
    """The op's expert tensors as the one value the kernels take.

    The kernels read weights through their strides, so a weight with one contiguous inner dimension is
    used in place: the gate and up halves of a transformers ``gate_up_proj``, or a transposed stack, are
    not copied on every call. Others are copied; so is a gate and up pair whose strides differ (the kernels
    read the two with one set), and the biases (small, indexed as contiguous rows).
    """
    w_in, w_out = _strided(w_in), _strided(w_out)
    if w_gate is not None:
        w_gate = _strided(w_gate)
        if w_gate.stride() != w_in.stride():
            w_in, w_gate = w_in.contiguous(), w_gate.contiguous()
    b_in, b_gate, b_out = (None if b is None else b.contiguous() for b in (b_in, b_gate, b_out))
    return ExpertTensors(w_in, w_gate, w_out, b_in, b_gate, b_out)


def _strided(w: Tensor) -> Tensor:
    """``w [E, rows, cols]`` as it is if a row or a column is contiguous, else a contiguous copy."""
    return w if 1 in (w.stride(1), w.stride(2)) else w.contiguous()


def _returned(grads: ExpertTensors, like: Tensor) -> tuple[Tensor, ...]:
    """Expert gradients as an op returns them: empty where a block has no such tensor."""
    return tuple(_or_empty(g, like) for g in grads)


def _eager_function(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """An op's forward, ``setup_context`` and backward as an ``autograd.Function``'s ``apply``; a call that
    autograd will not record (no grad mode, or no input that requires grad: inference) runs the forward
    alone, without the ``Function``'s bookkeeping (host time, which decode steps are made of).

    The backward launches kernels that autograd does not see through, so a backward that builds a graph
    (grad mode on inside it: ``create_graph=True``) is refused, naming the kernel that can, rather than giving
    wrong second-order gradients or an unrelated error. Through the ops (compiled, or tensor subclasses)
    torch refuses it itself: AOTAutograd has no double backward, and the backward ops no autograd formula."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)  # no zeros for the saved-for-backward outputs nobody uses
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            if torch.is_grad_enabled():
                raise ConfigError(
                    "the Triton kernels' backward is not differentiable, so second-order gradients "
                    "(create_graph=True: gradient penalties, Hessian-vector products, MAML) cannot go "
                    'through it; kernel="torch" supports them.'
                )
            return backward(ctx, *grads)

    def call(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
            return Eager.apply(*inputs)
        return forward(*inputs)

    return call


def _call(op: Callable, eager: Callable, *args):
    """``op(*args)`` where something traces (torch.compile, export, fake or functional tensors), else the
    same computation without the op's dispatch: ``eager``, the op's function (a backward op) or its
    ``autograd.Function`` (a forward op)."""
    plain = all(type(a) in (Tensor, torch.nn.Parameter) for a in args if isinstance(a, Tensor))
    return eager(*args) if plain and not torch.compiler.is_compiling() else op(*args)


# ---------------------------------------------------------------------------------------------------- MoE


def _moe_forward(
    x: Tensor,
    token_index: Tensor,
    expert_index: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    b_in: Tensor | None,
    b_gate: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    save: bool,
    pairs_per_token: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y [N, d], pre [P, h], pre_gate [P, h], routing)``; the pre-activations and the sorted routing
    (:attr:`ByExpert.packed`) are empty unless ``save``. ``pairs_per_token``: the plan's, 0 for None."""
    if x.shape[0] == 0:
        return x.new_empty(x.shape), x.new_empty(0), x.new_empty(0), _no_routing(x)
    with _device(x):
        routing = route(token_index, expert_index, weight, x.shape[0], w_in.shape[0], pairs_per_token)
        experts = _packed(w_in, w_gate, w_out, b_in, b_gate, b_out)
        y, pre, pre_gate = moe_forward(x.contiguous(), routing, experts, activation, save)
    return y, _or_empty(pre, x), _or_empty(pre_gate, x), routing.packed if save else _no_routing(x)


moe_forward_op = torch.library.custom_op("mixcompile::moe_forward", mutates_args=())(_moe_forward)


def _no_routing(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.int32)


@moe_forward_op.register_fake
def _(x, token_index, expert_index, weight, w_in, w_gate, w_out, b_in, b_gate, b_out, activation, save, _k):
    pairs, hidden = token_index.shape[0], w_in.shape[1]
    saved = save and x.shape[0]
    pre = x.new_empty(pairs, hidden) if saved else x.new_empty(0)
    pre_gate = x.new_empty(pairs, hidden) if saved and w_gate is not None else x.new_empty(0)
    size = packed_size(pairs, x.shape[0], w_in.shape[0])
    routing = x.new_empty(size, dtype=torch.int32) if saved else _no_routing(x)
    return x.new_empty(x.shape), pre, pre_gate, routing


def _dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a strided box (offset 0) holds each of ``0 .. numel - 1`` exactly once."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused_halves(w_in: Tensor, w_gate: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """Where the eager backward writes ``w_in``'s and ``w_gate``'s gradients when the two are the halves of
    one tensor (views that together cover it exactly once, as transformers' ``gate_up_proj`` is split):
    the same halves of one new tensor laid out like it. A consumer that knows the split passes that tensor
    on as the fused tensor's gradient without a copy (``mixcompile.integrations.transformers_experts``);
    any other consumer sees two ordinary gradients."""
    base = w_in._base
    if w_gate is None or base is None or w_gate._base is not base or w_gate.dtype != base.dtype:
        return None
    delta = int(w_gate.storage_offset() - w_in.storage_offset())
    together = _dense(tuple(w_in.shape) + (2,), tuple(w_in.stride()) + (abs(delta),))
    if not (
        w_gate.shape == w_in.shape
        and w_gate.stride() == w_in.stride()
        and base.numel() == 2 * w_in.numel()
        and _dense(tuple(base.shape), tuple(base.stride()))
        and together
        and min(w_in.storage_offset(), w_gate.storage_offset()) == base.storage_offset()
    ):
        return None
    grad = torch.empty_like(base)  # a dense base's strides are kept

    def half(w: Tensor) -> Tensor:
        offset = grad.storage_offset() + w.storage_offset() - base.storage_offset()
        return grad.as_strided(w.shape, w.stride(), offset)

    return half(w_in), half(w_gate)


def _moe_backward_grads(
    dy: Tensor,
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    pre: Tensor,
    pre_gate: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dw_in, dw_gate, dw_out, db_in, db_gate, db_out)``; absent ones empty. ``routing`` is
    what the forward op returned."""
    return _moe_backward_into(
        dy, x, routing, weight, w_in, w_gate, w_out, b_out, pre, pre_gate, activation, into=None
    )


def _moe_backward_eager(dy, x, routing, weight, w_in, w_gate, *rest) -> tuple[Tensor, ...]:
    """The backward without the op: the halves of a fused gate-up weight get the halves of one gradient
    (:func:`_fused_halves`), which an op could not return (its outputs may not alias each other)."""
    into = _fused_halves(w_in, w_gate)
    return _moe_backward_into(dy, x, routing, weight, w_in, w_gate, *rest, into=into)


def _moe_backward_into(
    dy, x, routing, weight, w_in, w_gate, w_out, b_out, pre, pre_gate, activation, *, into
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        return _zero_moe_grads(x, weight, w_in, w_gate, w_out, b_out)
    with _device(x):
        unpacked = unpack(routing, weight, x.shape[0], w_in.shape[0])
        experts = _packed(w_in, w_gate, w_out, None, None, b_out)
        dy, x = dy.contiguous(), x.contiguous()
        gate = _gate(pre_gate, w_gate)
        g = moe_backward(dy, x, unpacked, weight.dtype, experts, pre, gate, activation, into)
    dw_in, dw_gate, dw_out, db_in, db_gate, db_out = _returned(g.experts, x)
    return g.x, g.weight, dw_in, dw_gate, dw_out, db_in, db_gate, db_out


moe_backward_op = torch.library.custom_op("mixcompile::moe_backward", mutates_args=())(_moe_backward_grads)


def _zero_moe_grads(
    x, weight, w_in, w_gate, w_out, b_out
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of an empty batch: zeros shaped like the inputs (empties where absent), contiguous
    like those of a non-empty one."""
    e, h = w_in.shape[:2]
    bias = b_out is not None
    return (
        torch.zeros_like(x), torch.zeros_like(weight), w_in.new_zeros(w_in.shape),
        w_in.new_zeros(w_in.shape) if w_gate is not None else x.new_empty(0), w_out.new_zeros(w_out.shape),
        w_in.new_zeros(e, h) if bias else x.new_empty(0),
        w_in.new_zeros(e, h) if bias and w_gate is not None else x.new_empty(0),
        torch.zeros_like(b_out) if bias else x.new_empty(0),
    )  # fmt: skip


@moe_backward_op.register_fake
def _(dy, x, routing, weight, w_in, w_gate, w_out, b_out, pre, pre_gate, activation):
    e, h = w_in.shape[:2]
    bias = b_out is not None
    return (
        torch.empty_like(x), torch.empty_like(weight), w_in.new_empty(w_in.shape),
        w_in.new_empty(w_in.shape) if w_gate is not None else x.new_empty(0), w_out.new_empty(w_out.shape),
        w_in.new_empty(e, h) if bias else x.new_empty(0),
        w_in.new_empty(e, h) if bias and w_gate is not None else x.new_empty(0),
        torch.empty_like(b_out) if bias else x.new_empty(0),
    )  # fmt: skip


def _moe_setup(ctx, inputs, output) -> None:
    x, token_index, expert_index, weight, w_in, w_gate, w_out, b_in, b_gate, b_out, activation, *_ = inputs
    ctx.activation = activation
    ctx.optional = (w_gate is not None, b_in is not None, b_gate is not None)
    ctx.save_for_backward(x, weight, w_in, w_gate, w_out, b_out, *output[1:])


def _moe_backward(ctx, dy, _d_pre, _d_pre_gate, _d_routing):
    x, weight, w_in, w_gate, w_out, b_out, pre, pre_gate, routing = ctx.saved_tensors
    # Traced with a data-dependent number of pairs (capacity limits), the sizes are unknown: skip the check.
    unsaved = statically_known_true(routing.numel() == 0) and statically_known_true(weight.numel() != 0)
    if unsaved and x.shape[0]:
        raise RuntimeError("mixcompile::moe_forward ran without save=True; its inputs did not require grad.")
    dx, dweight, dw_in, dw_gate, dw_out, db_in, db_gate, db_out = _call(
        moe_backward_op, _moe_backward_eager,
        dy, x, routing, weight, w_in, w_gate, w_out, b_out, pre, pre_gate, ctx.activation,
    )  # fmt: skip
    has_gate, has_b_in, has_b_gate = ctx.optional
    return (
        dx, None, None, dweight, dw_in, dw_gate if has_gate else None, dw_out,
        db_in if has_b_in else None, db_gate if has_b_gate else None, db_out if b_out is not None else None,
        None, None, None,
    )  # fmt: skip


moe_forward_op.register_autograd(_moe_backward, setup_context=_moe_setup)
_moe_eager = _eager_function(_moe_forward, _moe_setup, _moe_backward)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _in_dtype(experts: StackedExperts, dtype: torch.dtype) -> ExpertTensors:
    """The expert tensors in the input's dtype (as autocast would give the reference kernel's matmuls); no
    ``to`` call where they are in it already (each is an ATen dispatch, host time at decode sizes)."""
    return experts.tensors.map(lambda t: t if t.dtype == dtype else t.to(dtype))


def moe(x: Tensor, plan: RoutingPlan, experts: StackedExperts) -> Tensor:
    """The fused MoE kernel: ``y[t] = sum over pairs (t, e, w) of w * expert_e(x[t])``."""
    tensors = _in_dtype(experts, x.dtype)
    save = _needs_grad(x, plan.weight, *tensors)
    routing = (plan.token_index, plan.expert_index, plan.weight)
    k = plan.pairs_per_token or 0
    y, _, _, _ = _call(moe_forward_op, _moe_eager, x, *routing, *tensors, experts.activation, save, k)
    return y


# ---------------------------------------------------------------------------------------------------- MoT


def _mot_forward(
    x_g: Tensor,
    merge: Tensor,
    emit: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    b_in: Tensor | None,
    b_gate: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y [T, n, G, d], pre [E·T·n, h], pre_gate, out [E·T·n, d])``; all but ``y`` empty unless ``save``."""
    with _device(x_g):
        experts = _packed(w_in, w_gate, w_out, b_in, b_gate, b_out)
        y, pre, pre_gate, out = mot_forward(
            x_g, merge.contiguous(), emit.contiguous(), experts, activation, save
        )
    return y, _or_empty(pre, x_g), _or_empty(pre_gate, x_g), _or_empty(out, x_g)


mot_forward_op = torch.library.custom_op("mixcompile::mot_forward", mutates_args=())(_mot_forward)


@mot_forward_op.register_fake
def _(x_g, merge, emit, w_in, w_gate, w_out, b_in, b_gate, b_out, activation, save):
    t, n, _, d = x_g.shape
    rows, hidden = w_in.shape[0] * t * n, w_in.shape[1]
    pre = x_g.new_empty(rows, hidden) if save else x_g.new_empty(0)
    pre_gate = x_g.new_empty(rows, hidden) if save and w_gate is not None else x_g.new_empty(0)
    out = x_g.new_empty(rows, d) if save else x_g.new_empty(0)
    return torch.empty_like(x_g), pre, pre_gate, out


def _mot_backward_grads(
    dy: Tensor,
    x_g: Tensor,
    merge: Tensor,
    emit: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    pre: Tensor,
    pre_gate: Tensor,
    out: Tensor,
    activation: str,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx_g, d_merge, d_emit, dw_in, dw_gate, dw_out, db_in, db_gate, db_out)``; absent ones empty."""
    with _device(x_g):
        experts = _packed(w_in, w_gate, w_out, None, None, None)
        g = mot_backward(
            dy, x_g, merge.contiguous(), emit.contiguous(), experts, pre, _gate(pre_gate, w_gate), out,
            activation, has_bias,
        )  # fmt: skip
    dw_in, dw_gate, dw_out, db_in, db_gate, db_out = _returned(g.experts, x_g)
    return g.x_g, g.merge, g.emit, dw_in, dw_gate, dw_out, db_in, db_gate, db_out


mot_backward_op = torch.library.custom_op("mixcompile::mot_backward", mutates_args=())(_mot_backward_grads)


@mot_backward_op.register_fake
def _(dy, x_g, merge, emit, w_in, w_gate, w_out, pre, pre_gate, out, activation, has_bias):
    e, h, d = w_in.shape
    return (
        torch.empty_like(x_g), torch.empty_like(merge, memory_format=torch.contiguous_format),
        torch.empty_like(emit, memory_format=torch.contiguous_format), w_in.new_empty(w_in.shape),
        w_in.new_empty(w_in.shape) if w_gate is not None else x_g.new_empty(0), w_out.new_empty(w_out.shape),
        w_in.new_empty(e, h) if has_bias else x_g.new_empty(0),
        w_in.new_empty(e, h) if has_bias and w_gate is not None else x_g.new_empty(0),
        w_in.new_empty(e, d) if has_bias else x_g.new_empty(0),
    )  # fmt: skip


def _mot_setup(ctx, inputs, output) -> None:
    x_g, merge, emit, w_in, w_gate, w_out, b_in, b_gate, b_out, activation, _ = inputs
    ctx.activation = activation
    ctx.optional = (w_gate is not None, b_in is not None, b_gate is not None, b_out is not None)
    ctx.save_for_backward(x_g, merge, emit, w_in, w_gate, w_out, *output[1:])


def _mot_backward(ctx, dy, _d_pre, _d_pre_gate, _d_out):
    x_g, merge, emit, w_in, w_gate, w_out, pre, pre_gate, out = ctx.saved_tensors
    if out.numel() == 0 and x_g.numel():
        raise RuntimeError("mixcompile::mot_forward ran without save=True; its inputs did not require grad.")
    has_gate, has_b_in, has_b_gate, has_b_out = ctx.optional
    dx, d_merge, d_emit, dw_in, dw_gate, dw_out, db_in, db_gate, db_out = _call(
        mot_backward_op, _mot_backward_grads,
        dy, x_g, merge, emit, w_in, w_gate, w_out, pre, pre_gate, out, ctx.activation, has_b_out,
    )  # fmt: skip
    return (
        dx, d_merge, d_emit, dw_in, dw_gate if has_gate else None, dw_out,
        db_in if has_b_in else None, db_gate if has_b_gate else None, db_out if has_b_out else None,
        None, None,
    )  # fmt: skip


mot_forward_op.register_autograd(_mot_backward, setup_context=_mot_setup)
_mot_eager = _eager_function(_mot_forward, _mot_setup, _mot_backward)


def mot(x_g: Tensor, plan: MixPlan, experts: StackedExperts) -> Tensor:
    """The fused MoT kernel: ``x_g [T, n, G, d]`` → merge per expert, run experts, emit back."""
    tensors = _in_dtype(experts, x_g.dtype)
    save = _needs_grad(x_g, plan.merge, plan.emit, *tensors)
    merge, emit = plan.merge.to(x_g.dtype), plan.emit.to(x_g.dtype)
    y, _, _, _ = _call(mot_forward_op, _mot_eager, x_g, merge, emit, *tensors, experts.activation, save)
    return y


# ------------------------------------------------------------------------------------------------ routing


def _topk_route(
    logits: Tensor, bias: Tensor | None, k: int, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs [N, E], chosen [N, k], weights [N, k])``: softmax, bias for selection, top-k, renormalise."""
    with _device(logits):
        return topk_route(logits, bias, k, renormalize)


topk_route_op = torch.library.custom_op("mixcompile::topk_route", mutates_args=())(_topk_route)


@topk_route_op.register_fake
def _(logits, bias, k, renormalize):
    n, e = logits.shape
    return (
        logits.new_empty(n, e, dtype=torch.float32),
        logits.new_empty(n, k, dtype=torch.int64),
        logits.new_empty(n, k, dtype=torch.float32),
    )


def _route_setup(ctx, inputs, output) -> None:
    ctx.renormalize = inputs[3]
    ctx.save_for_backward(*output)


def _route_backward(ctx, d_probs, _d_chosen, d_weights):
    probs, chosen, weights = ctx.saved_tensors
    return topk_route_backward(d_probs, d_weights, probs, chosen, weights, ctx.renormalize), None, None, None


topk_route_op.register_autograd(_route_backward, setup_context=_route_setup)
_route_eager = _eager_function(_topk_route, _route_setup, _route_backward)


def fused_topk_route(
    logits: Tensor, bias: Tensor | None, k: int, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused routing step (:func:`topk_route_op`), without the op's dispatch when nothing traces."""
    return _call(topk_route_op, _route_eager, logits, bias, k, renormalize)
