"""The reference kernel: plain PyTorch, autograd-native, any device and dtype.

It is the correctness oracle for every fused kernel, so it favours clarity over speed. Its MoE path loops
over experts in Python with sizes read from the routing, so ``torch.compile`` runs it eagerly (one graph
break per block); its MoT path has static shapes and compiles whole.
"""

from __future__ import annotations

import torch

from mixcompile import MixPlan, Register, RoutingPlan, StackedExperts, hookimpl, topk_routing


class TorchKernel:
    """Implements :class:`mixcompile.Kernel` in plain PyTorch."""

    priority = 0

    def supports(self, kind: str, device: torch.device, dtype: torch.dtype) -> bool:
        return kind in ("moe", "mot") and dtype.is_floating_point

    # Sizes read from the routing drive a Python loop: traced, it would recompile for every expert load.
    @torch.compiler.disable
    def moe(self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts) -> torch.Tensor:
        order = torch.argsort(plan.expert_index, stable=True)
        tokens = plan.token_index[order]
        weights = plan.weight[order].to(x.dtype)
        counts = torch.bincount(plan.expert_index, minlength=experts.num_experts).tolist()
        outputs = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = tokens[start : start + count]
                outputs.append(experts.expert_forward(e, x[rows]) * weights[start : start + count, None])
            start += count
        y = torch.zeros_like(x)
        if outputs:
            y = y.index_add(0, tokens, torch.cat(outputs))
        return y

    def topk_routing(
        self, logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return topk_routing(logits, top_k, bias=bias, renormalize=renormalize)

    def mot(self, x_g: torch.Tensor, plan: MixPlan, experts: StackedExperts) -> torch.Tensor:
        t, n, g, d = x_g.shape
        e = experts.num_experts
        mixed = torch.einsum("tnge,tngd->etnd", plan.merge, x_g).reshape(e, t * n, d)
        out = experts.batched_forward(mixed).reshape(e, t, n, d)
        return torch.einsum("tnge,etnd->tngd", plan.emit, out)


@hookimpl
def register_kernels(register: Register) -> None:
    register("torch", TorchKernel, description="plain PyTorch reference (CPU and GPU, autograd-native)")
