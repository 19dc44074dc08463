"""A third-party mixcompile plugin: the cosine router of X-MoE (Chi et al. 2022).

Tokens are projected to a small space and compared by cosine similarity with one learned embedding per
expert, divided by a learned temperature. Normalising both sides keeps the logits bounded, which
counters the representation collapse of dot-product routers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mixcompile as mc


class CosineRouter(mc.LearnedRouter):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        d_route: int = 16,
        temperature: float = 0.07,
        **options: Any,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)  # capacity, losses, jitter, ...
        if not temperature > 0:
            raise mc.ConfigError(f"temperature must be > 0, got {temperature!r}.")
        del self.gate  # scores come from score() below: no unused parameter (DDP would complain of it)
        self.project = nn.Linear(d_model, d_route, bias=False)
        self.expert_embedding = nn.Parameter(torch.randn(num_experts, d_route) / math.sqrt(d_route))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Replaces the linear gate; ``logits`` (inherited) adds the jitter and casts to float32."""
        tokens = F.normalize(self.project(x), dim=-1)
        experts = F.normalize(self.expert_embedding, dim=-1)
        temperature = self.log_temperature.exp().clamp(min=0.01)
        return tokens @ experts.t() / temperature

    def forward(self, x: torch.Tensor, kernel: mc.Kernel) -> mc.RoutingPlan:
        logits = self.logits(x)
        # The block's kernel runs the top-k step (fused on GPUs), with the balancing bias if it is on.
        probs, chosen, weights = kernel.topk_routing(
            logits, self.top_k, bias=self.balancing_bias, renormalize=True
        )
        return self.token_choice_plan(logits, chosen, weights, probs)


@mc.hookimpl
def register_routers(register: mc.RouterRegister) -> None:
    register("cosine", CosineRouter, description="cosine similarity with a learned temperature (X-MoE)")
