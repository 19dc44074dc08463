"""The fused Triton kernel: grouped GEMMs for MoE, fused mix / experts / unmix for MoT.

It runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks it
against the torch reference. The kernel modules are imported on first use, so neither Triton nor the op
registrations are loaded by ``import mixcompile``.
"""

from __future__ import annotations

import importlib.util

import torch

from mixcompile import (
    BlockKind,
    Kernel,
    KernelRegister,
    MixPlan,
    RoutingPlan,
    StackedExperts,
    hookimpl,
    topk_routing,
)
from mixcompile_plugins.triton import MAX_ROUTED_EXPERTS, interpreting

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonKernel(Kernel):
    """:class:`mixcompile.Kernel` with fused Triton kernels; Triton is imported on first use."""

    priority = 10

    def supports(self, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> bool:
        if kind not in ("moe", "mot") or dtype not in _DTYPES or not _HAS_TRITON:
            return False
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def auto_priority(self, kind: BlockKind, device: torch.device, dtype: torch.dtype) -> int:
        """Below the torch kernel (0) for MoT blocks on CUDA, so ``auto`` picks the einsum path there: on an
        H100 (2026-11-26, ``benchmarks/bench_kernels.py``) the fused MoT training step took 3.5 ms (G16) and
        3.3 ms (G32) against the einsum's 1.8 and 2.2 ms, with 1.7-2x its memory. ``kernel="triton"`` still
        runs it; the interpreter (CPU) keeps the plain priority, so CI exercises it under ``auto``."""
        return -1 if kind == "mot" and device.type == "cuda" else self.priority

    def moe(self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts) -> torch.Tensor:
        from mixcompile_plugins.triton import ops

        return ops.moe(x, plan, experts)

    def topk_routing(
        self, logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None = None, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused step (softmax, selection bias, top-k, renormalisation) for float32 logits of up to
        ``MAX_ROUTED_EXPERTS`` experts; the plain-PyTorch step otherwise."""
        if logits.dtype != torch.float32 or logits.shape[-1] > MAX_ROUTED_EXPERTS:
            return topk_routing(logits, top_k, bias=bias, renormalize=renormalize)
        from mixcompile_plugins.triton.ops import fused_topk_route

        return fused_topk_route(logits, bias, top_k, renormalize)

    def mot(self, x_g: torch.Tensor, plan: MixPlan, experts: StackedExperts) -> torch.Tensor:
        from mixcompile_plugins.triton import ops

        return ops.mot(x_g, plan, experts)


@hookimpl
def register_kernels(register: KernelRegister) -> None:
    register(
        "triton",
        TritonKernel,
        description="fused Triton MoE grouped GEMM and MoT mix/experts/unmix (CUDA, or TRITON_INTERPRET=1)",
    )
