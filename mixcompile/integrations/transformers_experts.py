"""mixcompile's kernels as an experts implementation of Hugging Face transformers.

transformers (5.x) keeps the experts of its MoE models as 3-D tensors in modules decorated with
``use_experts_implementation`` and dispatches their ``forward(hidden_states [N, d], top_k_index [N, k],
top_k_weights [N, k])`` by ``config._experts_implementation`` through its ``ExpertsInterface``.
:func:`register_transformers_experts` adds ``"mixcompile"`` to that interface; its forward

1. reads the module's layout (the flags the decorator set: ``has_gate``, ``is_concatenated``,
   ``is_transposed``, ``has_bias``, ``has_post_expert_norm``, plus its ``act_fn`` and ``_apply_gate``) and
   refuses, naming the class and the flag, what mixcompile's experts cannot express;
2. views the module's own parameters as mixcompile's stacked experts (``w_in/w_gate [E, h, d]``,
   ``w_out [E, d, h]``): slices and transposes, never copies, so gradients reach the module's parameters;
3. turns ``top_k_index`` / ``top_k_weights`` into a :class:`mixcompile.RoutingPlan` and runs a kernel
   plugin's ``moe`` (``kernel="auto"``: Triton on CUDA, the torch reference elsewhere).

Nothing here imports transformers at import time; :func:`register_transformers_experts` does, once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast, get_args

import torch
from torch import nn

from mixcompile.compiler.activation_names import function_activation, module_activation
from mixcompile.errors import ConfigError, MixcompileError, ShapeError
from mixcompile.runtime.experts import ExpertMath
from mixcompile.runtime.kernels import Kernel, get_kernel, resolve_kernel
from mixcompile.runtime.routing import RoutingPlan
from mixcompile.types import Activation

IMPLEMENTATION = "mixcompile"
_MOE_MODULE = "transformers.integrations.moe"
# What transformers itself registers or treats specially: registering over them would change its models.
_RESERVED = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# transformers' activation classes whose function is known from the class alone (no probe needed, so they
# are recognised while torch.compile traces too). Others are probed once, in eager mode.
_HF_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "ReLUSquaredActivation": "squared_relu",
    "LinearActivation": "identity",
}


@dataclass(frozen=True)
class ExpertsLayout:
    """How a transformers experts module stores its experts, in mixcompile's terms."""

    module_class: str
    num_experts: int
    d_model: int
    d_hidden: int
    gated: bool  # ``has_gate``: act(gate) * up (``gate_up_proj``), else act(up) (``up_proj``)
    concatenated: bool  # ``is_concatenated``: [gate; up] halves, else interleaved rows gate0, up0, ...
    transposed: bool  # ``is_transposed``: weights stored [E, in, out] instead of nn.Linear's [E, out, in]
    bias: bool  # ``has_bias``
    activation: Activation  # mixcompile's name for ``act_fn``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- discovery


def is_experts_module(module: object) -> bool:
    """Whether ``module`` is a transformers experts module (its class went through
    ``use_experts_implementation``, which replaces ``forward`` with a dispatcher)."""
    moe = sys.modules.get(_MOE_MODULE)  # not imported: no such module can exist
    if moe is None or not isinstance(module, nn.Module):
        return False
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    return code is not None and code.co_filename == moe.__file__ and code.co_name == "forward"


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every transformers experts module in ``model``."""
    return [(path, module) for path, module in model.named_modules() if is_experts_module(module)]


def implementation_of(module: nn.Module) -> str | None:
    """The experts implementation the module dispatches to now (``config._experts_implementation``)."""
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None)


# ------------------------------------------------------------------------------------------------- layout


def _refuse(module: nn.Module, what: str) -> ConfigError:
    return ConfigError(f"{type(module).__name__}: {what}")


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """Read (and check) the layout of a transformers experts module.

    Raises :class:`mixcompile.ConfigError` naming the class and the flag for what mixcompile's kernels
    cannot compute exactly as transformers' own implementations do.
    """
    if not is_experts_module(module):
        raise ConfigError(
            f"{type(module).__name__} is not a transformers experts module "
            "(a class decorated with transformers.integrations.use_experts_implementation)."
        )
    if getattr(module, "_is_expert_parallel", False):
        raise _refuse(
            module,
            "expert parallelism (`_is_expert_parallel=True`) is not supported: its routing holds sentinel "
            "indices for experts on other ranks; use mixcompile.distributed for expert parallelism.",
        )
    if getattr(module, "has_post_expert_norm", False):
        raise _refuse(
            module,
            "`has_post_expert_norm=True` (a norm on each expert's output before weighting) is not "
            "supported by mixcompile's kernels; use experts_implementation='grouped_mm' for this model.",
        )
    gated = bool(module.has_gate)
    if gated:
        _check_gate(module)
    transposed, bias = bool(module.is_transposed), bool(module.has_bias)
    up_name = "gate_up_proj" if gated else "up_proj"
    w_up, w_down = _weight(module, up_name), _weight(module, "down_proj")
    if transposed:
        w_up, w_down = w_up.mT, w_down.mT
    e, rows, d = w_up.shape
    h = rows // 2 if gated else rows
    if gated and rows % 2:
        raise _refuse(module, f"`{up_name}` has {rows} output rows, an odd number: no gate/up halves.")
    if tuple(w_down.shape) != (e, d, h):
        layout = "[E, h, d] (is_transposed=True)" if transposed else "[E, d, h]"
        raise _refuse(
            module,
            f"`down_proj` has shape {tuple(_weight(module, 'down_proj').shape)}, expected {layout} with "
            f"E={e}, d={d}, h={h} from `{up_name}` {tuple(_weight(module, up_name).shape)}.",
        )
    num_experts = getattr(module, "num_experts", e)
    if num_experts != e:
        raise _refuse(module, f"`num_experts` is {num_experts} but `{up_name}` stacks {e} experts.")
    if bias:
        for name, shape in ((f"{up_name}_bias", (e, rows)), ("down_proj_bias", (e, d))):
            got = tuple(_weight(module, name).shape)
            if got != shape:
                raise _refuse(module, f"`{name}` has shape {got}, expected {shape}.")
    return ExpertsLayout(
        module_class=type(module).__name__,
        num_experts=e,
        d_model=d,
        d_hidden=h,
        gated=gated,
        concatenated=bool(getattr(module, "is_concatenated", True)),
        transposed=transposed,
        bias=bias,
        activation=_activation(module),
    )


def _check_gate(module: nn.Module) -> None:
    """A class may define its own ``_apply_gate`` (clamped or scaled SwiGLU, ...); transformers'
    grouped_mm / batched_mm call it, mixcompile's kernels fuse ``act(gate) * up`` and cannot."""
    moe = sys.modules[_MOE_MODULE]
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate is not moe._default_apply_gate:
        sizes = ("num_experts", "hidden_dim", "intermediate_dim", "hidden_size", "intermediate_size")
        extras = sorted(
            name
            for name, value in vars(module).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and not name.startswith("_") and name not in sizes
        )  # fmt: skip
        detail = f" (it uses {', '.join(f'`{n}`' for n in extras)})" if extras else ""
        raise _refuse(
            module,
            f"its own `_apply_gate`{detail} replaces the standard `act(gate) * up` gating; mixcompile's "
            "kernels compute only the standard form. Use experts_implementation='grouped_mm' for this model.",
        )


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        flags = f"has_gate={module.has_gate}, has_bias={module.has_bias}"
        raise _refuse(module, f"has no tensor `{name}`, which its flags ({flags}) promise.")
    if tensor.dtype not in _DTYPES or type(tensor) not in (torch.Tensor, nn.Parameter):
        raise _refuse(
            module,
            f"`{name}` is a {type(tensor).__name__} of {tensor.dtype}; mixcompile's kernels take plain "
            "float32/bfloat16/float16 tensors (quantized experts are not supported).",
        )
    if tensor.ndim != (3 if name in ("gate_up_proj", "up_proj", "down_proj") else 2):
        raise _refuse(module, f"`{name}` has shape {tuple(tensor.shape)}, expected stacked experts.")
    return tensor


# The attribute an experts module's activation keeps the name its probe found under, so that a compiled
# forward (which cannot probe) reads it.
_PROBED = "_mixcompile_activation"


def _activation(module: nn.Module) -> Activation:
    act = getattr(module, "act_fn", None)
    name: str | None = None
    if isinstance(act, nn.Module):
        cls = type(act)
        probed = getattr(act, _PROBED, None)  # what an eager forward found by probing it
        if probed is not None:
            name = probed
        elif cls.__module__ == "transformers.activations" and cls.__name__ in _HF_ACTIVATIONS:
            name = _HF_ACTIVATIONS[cls.__name__]
        elif isinstance(act, nn.Identity):
            name = "identity"
        elif cls.__module__.startswith("torch."):
            name = module_activation(act)  # torch's classes, by type
        elif not torch.compiler.is_compiling():
            name = module_activation(act)  # anything else by probing it, in eager mode; kept for compiling
            if name is not None:
                object.__setattr__(act, _PROBED, name)
        else:
            raise _refuse(
                module,
                f"its activation {cls.__name__} is recognised only by probing it, which cannot run while "
                "torch.compile traces; run one forward eagerly first or use a known activation.",
            )
    elif callable(act):
        name = function_activation(act, {})
    if name is None:
        raise _refuse(
            module,
            f"its activation `act_fn` ({type(act).__name__}) is not one mixcompile's kernels compute "
            f"({', '.join(get_args(Activation))}).",
        )
    return cast(Activation, name)  # the names found are normalised ones


# ------------------------------------------------------------------------------------------------ the view


class ExpertsView(ExpertMath):
    """A transformers experts module's parameters seen as :class:`mixcompile.StackedExperts`.

    Holds views (slices, transposes) of the module's own tensors, so nothing is copied and autograd
    carries gradients back to the module's parameters. It offers what kernels read from
    ``StackedExperts``: the tensors, ``num_experts / d_model / d_hidden / activation / gated / bias`` and
    ``batched_forward``.
    """

    def __init__(
        self,
        w_in: torch.Tensor,
        w_gate: torch.Tensor | None,
        w_out: torch.Tensor,
        b_in: torch.Tensor | None,
        b_gate: torch.Tensor | None,
        b_out: torch.Tensor | None,
        activation: Activation,
    ) -> None:
        self.w_in, self.w_gate, self.w_out = w_in, w_gate, w_out
        self.b_in, self.b_gate, self.b_out = b_in, b_gate, b_out
        self.num_experts, self.d_hidden, self.d_model = w_in.shape
        self.activation = activation
        self.gated = w_gate is not None
        self.bias = b_out is not None


def experts_view(module: nn.Module, layout: ExpertsLayout | None = None) -> ExpertsView:
    """The module's experts as an :class:`ExpertsView` (views of its parameters, no copies)."""
    layout = experts_layout(module) if layout is None else layout
    h, transposed = layout.d_hidden, layout.transposed
    up_name = "gate_up_proj" if layout.gated else "up_proj"
    w_up, w_out = cast(torch.Tensor, getattr(module, up_name)), cast(torch.Tensor, module.down_proj)
    b_up = getattr(module, f"{up_name}_bias") if layout.bias else None
    b_out = cast(torch.Tensor, module.down_proj_bias) if layout.bias else None
    w_out = w_out.mT if transposed else w_out
    w_gate = b_gate = None
    w_in, b_in = (w_up.mT if transposed else w_up), b_up
    if layout.gated:
        w_gate, w_in = _gate_up_halves(w_up, h, layout.concatenated, transposed)
        if b_up is not None:
            b_gate, b_in = _split_gate_up(b_up, h, layout.concatenated)
    return ExpertsView(w_in, w_gate, w_out, b_in, b_gate, b_out, layout.activation)


def _split_gate_up(t: torch.Tensor, h: int, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of a stacked gate-up tensor ``[E, 2h, ...]``."""
    if concatenated:
        return t[:, :h], t[:, h:]
    return t[:, 0::2], t[:, 1::2]


def _gate_up_halves(
    fused: torch.Tensor, h: int, concatenated: bool, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views ``[E, h, d]`` of a fused gate-up weight, through :class:`_GateUpHalves` where its
    gradient is wanted in an eager forward (``torch.compile`` gets the plain views: the copy below is then
    the compiler's to fuse)."""
    if torch.is_grad_enabled() and fused.requires_grad and not torch.compiler.is_compiling():
        gate, up = _GateUpHalves.apply(fused, h, concatenated, transposed)  # type: ignore[no-untyped-call]
        return gate, up
    return _split_gate_up(fused.mT if transposed else fused, h, concatenated)


class _GateUpHalves(torch.autograd.Function):
    """The halves of a fused gate-up weight, with one backward for both.

    Plain slicing would send each half's gradient back through a slice backward: a zero-filled tensor the
    size of the whole weight, a copy of the half into it, then the sum of the two (on an H100 that doubled
    a Mixtral experts layer's forward+backward at decode sizes, 11.1 ms against 5.9). Here the two halves
    are joined with one copy, and with none when a kernel wrote them as the halves of one tensor laid out
    like the fused weight (the Triton kernel's eager backward does): that tensor is the gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, fused: torch.Tensor, h: int, concatenated: bool, transposed: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = _split_gate_up(fused.mT if transposed else fused, h, concatenated)
        start = fused.storage_offset()
        ctx.fused = (fused.shape, fused.stride())
        ctx.halves = tuple((v.stride(), v.storage_offset() - start) for v in (gate, up))
        ctx.concatenated, ctx.transposed = concatenated, transposed
        return gate, up

    @staticmethod
    def backward(ctx: Any, d_gate: torch.Tensor, d_up: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = _one_tensor(d_gate, d_up, ctx.fused, ctx.halves)
        if grad is None:
            joined = (
                torch.cat([d_gate, d_up], 1)
                if ctx.concatenated
                else torch.stack([d_gate, d_up], 2).flatten(1, 2)
            )
            grad = joined.mT if ctx.transposed else joined
        return grad, None, None, None


def _one_tensor(
    d_gate: torch.Tensor, d_up: torch.Tensor, fused: tuple[Any, ...], halves: tuple[Any, ...]
) -> torch.Tensor | None:
    """The tensor whose halves ``d_gate`` and ``d_up`` are, laid out as the fused weight and its halves were;
    None if they are not that."""
    whole = d_gate._base
    if whole is None or d_up._base is not whole or (whole.shape, whole.stride()) != fused:
        return None
    start = whole.storage_offset()
    if any(
        (d.stride(), d.storage_offset() - start) != half
        for d, half in zip((d_gate, d_up), halves, strict=True)
    ):
        return None
    return whole


# ---------------------------------------------------------------------------------------------- forward


def routing_plan(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> RoutingPlan:
    """The (token, expert, weight) pairs of a top-k table: token ``t``'s pairs are ``k`` consecutive ones."""
    n, k = top_k_index.shape
    token = torch.arange(n, device=top_k_index.device).repeat_interleave(k)
    return RoutingPlan(
        token_index=token,
        expert_index=top_k_index.reshape(-1).to(torch.int64),
        weight=top_k_weights.reshape(-1),
        num_tokens=n,
        num_experts=num_experts,
        pairs_per_token=k,
    )


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KernelChoices:
    """The kernel an experts implementation runs with, per (device type, dtype).

    Choosing walks the plugin registry, which ``torch.compile`` cannot trace, so a registered
    implementation chooses ahead (:meth:`choose_ahead`: the CPU and, where there is one, CUDA, in every
    floating dtype) and its forward only looks the choice up; anything else is chosen on first use. A
    kernel plugin registered later is seen by registering the implementation again.
    """

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.chosen: dict[tuple[str, torch.dtype], Kernel] = {}

    def choose_ahead(self) -> None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        for device in devices:
            for dtype in _FLOATS:
                # no kernel for it: a forward that needs it raises the reason then
                with contextlib.suppress(MixcompileError):
                    self(torch.device(device), dtype)

    def __call__(self, device: torch.device, dtype: torch.dtype) -> Kernel:
        runner = self.chosen.get((device.type, dtype))
        if runner is None:
            runner = resolve_kernel(self.kernel, "moe", device, dtype)[1]
            self.chosen[(device.type, dtype)] = runner
        return runner


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    kernel: str | KernelChoices = "auto",
) -> torch.Tensor:
    """What a transformers experts module computes, run by a mixcompile kernel plugin (``kernel``: a
    kernel name, ``"auto"``, or the :class:`KernelChoices` of a registered implementation)."""
    layout = experts_layout(module)
    d = layout.d_model
    if hidden_states.shape[-1] != d or top_k_index.shape != top_k_weights.shape or top_k_index.ndim < 1:
        raise ShapeError(
            f"{layout.module_class}: expected hidden_states [..., {d}] and top_k_index / top_k_weights of "
            f"one shape [..., k], got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
            f"{tuple(top_k_weights.shape)}."
        )
    x = hidden_states.reshape(-1, d)
    if torch.is_autocast_enabled(
        x.device.type
    ):  # compute in the autocast dtype, as the module's matmuls would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    k = top_k_index.shape[-1]
    if top_k_index.numel() != x.shape[0] * k:
        raise ShapeError(
            f"{layout.module_class}: {x.shape[0]} tokens but top_k_index {tuple(top_k_index.shape)}."
        )
    plan = routing_plan(top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k), layout.num_experts)
    choices = kernel if isinstance(kernel, KernelChoices) else KernelChoices(kernel)
    runner = choices(x.device, x.dtype)
    y = runner.moe(x, plan, experts_view(module, layout))  # type: ignore[arg-type]  # duck-typed experts
    return y.reshape(hidden_states.shape).to(hidden_states.dtype)


def _make_forward(kernel: str) -> Callable[..., torch.Tensor]:
    choices = KernelChoices(kernel)
    choices.choose_ahead()  # so a compiled forward walks no registry

    def mixcompile_experts_forward(
        self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, kernel=choices)

    mixcompile_experts_forward.mixcompile_kernel = kernel  # type: ignore[attr-defined]
    return mixcompile_experts_forward


def register_transformers_experts(name: str = IMPLEMENTATION, *, kernel: str = "auto") -> str:
    """Register mixcompile as transformers experts implementation ``name``; returns ``name``.

    After it, ``AutoModelForCausalLM.from_pretrained(..., experts_implementation="mixcompile")``,
    ``model.set_experts_implementation("mixcompile")`` or a config with ``experts_implementation=
    "mixcompile"`` run the experts of every MoE model built on transformers' experts interface through
    mixcompile's kernel plugins. ``kernel="auto"`` picks per device and dtype (Triton on CUDA, the torch
    reference elsewhere), ahead of the forward so that ``torch.compile`` traces no registry look-up (see
    :class:`KernelChoices`); name a kernel to pin it, under another name: ``register_transformers_experts(
    "mixcompile_triton", kernel="triton")``. Calling again with the same arguments is harmless, and
    chooses again (after registering another kernel plugin, say).
    """
    if not isinstance(name, str) or not name or name in _RESERVED:
        raise ConfigError(
            f"name must be a new experts implementation name, not one of transformers' own {_RESERVED}; "
            f"got {name!r}."
        )
    if kernel != "auto":
        get_kernel(kernel)  # an unknown kernel fails now, with a suggestion
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ConfigError(
            "register_transformers_experts needs transformers with the experts interface "
            f"(transformers>=5, transformers.integrations.moe.ExpertsInterface): {exc}"
        ) from exc
    ExpertsInterface.register(name, _make_forward(kernel))
    return name


# ------------------------------------------------------------------------------------------------- inspect


def describe_experts_module(module: nn.Module) -> dict[str, Any]:
    """What ``inspect`` says about a transformers experts module: its implementation now, whether
    mixcompile can run it (else why not), and the mixcompile kernel it runs with (or would, under
    ``experts_implementation="mixcompile"``)."""
    implementation = implementation_of(module)
    try:
        layout = experts_layout(module)
    except ConfigError as exc:
        reason = str(exc).split(": ", 1)[-1]
        return {"implementation": implementation, "supported": False, "reason": reason, "kernel": None}
    weight = cast(torch.Tensor, module.gate_up_proj if layout.gated else module.up_proj)
    pinned = getattr(_registered().get(implementation or ""), "mixcompile_kernel", None)
    try:
        kernel = resolve_kernel(pinned or "auto", "moe", weight.device, weight.dtype)[0]
    except ConfigError as exc:
        kernel = f"none ({exc})"
    return {
        "implementation": implementation,
        "supported": True,
        "reason": None,
        "kernel": kernel,
        "layout": layout.to_dict(),
    }


def _registered() -> dict[str, Any]:
    """transformers' registered experts implementations (empty where its experts interface is not loaded)."""
    moe = sys.modules.get(_MOE_MODULE)
    return dict(moe.ExpertsInterface._global_mapping) if moe is not None else {}
