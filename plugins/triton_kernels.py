"""The fused Triton kernel: grouped GEMMs for MoE, fused mix / experts / unmix for MoT.

It runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks it
against the torch reference. ``mixcompile.triton`` is imported on first use, so neither Triton nor the op
registrations are loaded by ``import mixcompile``.
"""

from __future__ import annotations

import importlib.util

import torch

from mixcompile.experts import StackedExperts
from mixcompile.hookspecs import Register, hookimpl
from mixcompile.kernels import BLOCK_KINDS, Kernel
from mixcompile.mixing import MixPlan
from mixcompile.routing import RoutingPlan
from mixcompile.triton import interpreting

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonKernel(Kernel):
    priority = 10

    def supports(self, kind: str, device: torch.device, dtype: torch.dtype) -> bool:
        if kind not in BLOCK_KINDS or dtype not in _DTYPES or not _HAS_TRITON:
            return False
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def moe(self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts) -> torch.Tensor:
        from mixcompile.triton import ops

        return ops.moe(x, plan, experts)

    def mot(self, x_g: torch.Tensor, plan: MixPlan, experts: StackedExperts) -> torch.Tensor:
        from mixcompile.triton import ops

        return ops.mot(x_g, plan, experts)


@hookimpl
def register_kernels(register: Register) -> None:
    register(
        "triton",
        TritonKernel,
        description="fused Triton MoE grouped GEMM and MoT mix/experts/unmix (CUDA, or TRITON_INTERPRET=1)",
    )
