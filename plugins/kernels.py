"""The reference kernel: plain PyTorch, autograd-native, any device and dtype.

It is the correctness oracle for every fused kernel, so it favours clarity over speed. Its MoE path sorts
the (token, expert) pairs by expert and runs each projection as one grouped matrix product over the sorted
rows. Every shape in it is static (``N * k`` pairs; the per-expert sizes are data, passed as offsets), so
``torch.compile`` traces it whole: the grouped product is a ``torch.library`` custom op
(``mixcompile_torch::grouped_mm``), opaque to the tracer, which runs ``torch._grouped_mm`` where that
exists for the device and dtype (on the CPU, 16- and 32-bit floats with 16-byte aligned rows; measured
faster than a loop over experts) and a loop over the experts' row ranges elsewhere (float64, older PyTorch,
GPUs it does not support). ``torch._grouped_mm`` itself cannot be traced in float32 (its meta function
accepts bfloat16 only), hence the op. The MoT path is dense batched ``einsum`` s. Hidden dropout
(``experts.hidden_dropout``) is applied on both paths (``experts.activate``).
"""

from __future__ import annotations

from typing import Any

import torch

from mixcompile import BlockKind, Kernel, KernelRegister, MixPlan, RoutingPlan, StackedExperts, hookimpl

Tensor = torch.Tensor
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_grouped_mm_runs: dict[tuple[str, torch.dtype], bool] = {}


class TorchKernel(Kernel):
    """:class:`mixcompile.Kernel` in plain PyTorch (its routing step is the one ``Kernel`` has)."""

    priority = 0
    hidden_dropout = True  # experts.activate applies it on every path

    def supports(self, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> bool:
        return kind in ("moe", "mot") and dtype.is_floating_point

    def moe(self, x: Tensor, plan: RoutingPlan, experts: StackedExperts) -> Tensor:
        order = torch.argsort(plan.expert_index, stable=True)
        tokens, expert = plan.token_index[order], plan.expert_index[order]
        counts = torch.zeros(experts.num_experts, dtype=torch.int32, device=x.device)
        ones = torch.ones_like(expert, dtype=torch.int32)
        offsets = torch.cumsum(counts.index_add(0, expert, ones), 0, dtype=torch.int32)
        rows = x[tokens]

        def project(inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            # in the input's dtype, as autocast casts a matmul's operands (a custom op is not autocast)
            out = grouped_mm(inputs, weight.mT.to(inputs.dtype), offsets)
            return out if bias is None else out + bias.index_select(0, expert).to(out.dtype)

        up = project(rows, experts.w_in, experts.b_in)
        gate = None if experts.w_gate is None else project(rows, experts.w_gate, experts.b_gate)
        out = project(experts.activate(up, gate), experts.w_out, experts.b_out)
        weights = plan.weight[order].to(x.dtype)
        return torch.zeros_like(x).index_add(0, tokens, out * weights[:, None])

    def mot(self, x_g: Tensor, plan: MixPlan, experts: StackedExperts) -> Tensor:
        t, n, g, d = x_g.shape
        e = experts.num_experts
        # A mixer may plan in another dtype; no dispatch where it does not (host time, at decode sizes).
        merge, emit = (p if p.dtype == x_g.dtype else p.to(x_g.dtype) for p in (plan.merge, plan.emit))
        mixed = torch.einsum("tnge,tngd->etnd", merge, x_g).reshape(e, t * n, d)
        out = experts.batched_forward(mixed).reshape(e, t, n, d)
        return torch.einsum("tnge,etnd->tngd", emit, out)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """``a [P, K]`` rows grouped by ``offsets [E]`` (cumulative ends, int32) times ``b [E, K, N]``."""
    out: Tensor = _grouped_mm_op(a, b, offsets)  # a CustomOpDef's call is unannotated
    return out


@torch.library.custom_op("mixcompile_torch::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if _native(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, (start, end) in enumerate(_ranges(offsets)):
        out[start:end] = a[start:end] @ b[e]
    return out


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("mixcompile_torch::grouped_mm_wgrad", mutates_args=())
def _grouped_wgrad_op(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """``[E, K, N]``: per group, ``a_g^T @ grad_g`` (the gradient of ``b``)."""
    if _native(a, grad):
        return torch._grouped_mm(a.t(), grad, offs=offsets)
    out = a.new_zeros(offsets.shape[0], a.shape[1], grad.shape[1])
    for e, (start, end) in enumerate(_ranges(offsets)):
        out[e] = a[start:end].t() @ grad[start:end]
    return out


@_grouped_wgrad_op.register_fake
def _(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(offsets.shape[0], a.shape[1], grad.shape[1])


def _setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = _grouped_mm_op(grad, b.mT.contiguous(), offsets) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_wgrad_op(a, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def _ranges(offsets: Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _native(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: a dtype and device it runs on (probed once), and
    matrices stored row- or column-major with rows whose strides are multiples of 16 bytes (views of
    another model's experts, e.g. every other row of a fused gate-up weight, are neither: they take the
    loop)."""
    aligned = all(size * a.element_size() % 16 == 0 for size in (a.shape[-1], b.shape[-1]))
    strided = _dense_layout(a) and _dense_layout(b)
    return aligned and strided and a.dtype == b.dtype and _grouped_mm_available(a.device, a.dtype)


def _dense_layout(t: Tensor) -> bool:
    """Row- or column-major in its last two dimensions, every other stride a multiple of 16 bytes."""
    inner = (t.stride(-1), t.stride(-2))
    if 1 not in inner:
        return False
    others = [inner[1] if inner[0] == 1 else inner[0], *t.stride()[:-2]]
    return all(stride * t.element_size() % 16 == 0 for stride in others)


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _grouped_mm_runs:
        _grouped_mm_runs[key] = (
            dtype in _GROUPED_DTYPES and hasattr(torch, "_grouped_mm") and _probe(device, dtype)
        )
    return _grouped_mm_runs[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` exists from PyTorch 2.8, on the CPU and some GPUs; try it once, both ways."""
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs)
        torch._grouped_mm(a.t(), a, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@hookimpl
def register_kernels(register: KernelRegister) -> None:
    register("torch", TorchKernel, description="plain PyTorch reference (CPU and GPU, autograd-native)")
