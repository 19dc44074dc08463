"""Built-in MoE routers: top-k (two orders), Switch top-1, expert choice, hash."""

from __future__ import annotations

import math
from typing import Any, Literal, TypeAlias, get_args

import torch

from mixcompile import (
    ConfigError,
    Kernel,
    LearnedRouter,
    RouterBase,
    RouterRegister,
    RoutingPlan,
    check_bool,
    check_choice,
    check_positive_int,
    hookimpl,
    warn,
)

TopKOrder: TypeAlias = Literal["softmax_topk", "topk_softmax"]
TOPK_ORDERS: tuple[TopKOrder, ...] = get_args(TopKOrder)


class TopKRouter(LearnedRouter):
    """Token choice (Shazeer 2017). ``order="softmax_topk"``: softmax over all experts, keep the top k,
    renormalise them to sum to 1 (``renormalize=False`` keeps the raw probabilities).
    ``order="topk_softmax"``: top k logits, softmax over those k (Mixtral)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        order: TopKOrder = "softmax_topk",
        renormalize: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        check_bool("renormalize", renormalize)
        check_choice("order", order, TOPK_ORDERS)
        if order == "topk_softmax" and not renormalize:
            raise ConfigError("renormalize=False only applies to order='softmax_topk'.")
        self.order = order
        self.renormalize = renormalize

    @property
    def weights_sum_to_one(self) -> bool:
        """Renormalised (or softmax over the k picks) and dropless: an upcycled block computes the FFN."""
        return (self.renormalize or self.order == "topk_softmax") and self.capacity_factor is None

    def forward(self, x: torch.Tensor, kernel: Kernel) -> RoutingPlan:
        if self.training and self.top_k == 1 and self.renormalize and not torch.compiler.is_compiling():
            # Said when it matters, in training (not when a saved model is loaded for inference).
            warn(
                f"a top-k router with top_k=1 (order={self.order!r}, renormalised) gives every token weight "
                "1: the task loss sends its gate no gradient, only the balancing and z losses train it. For "
                "a gate the loss trains, use router='switch' or renormalize=False (weights p, so an "
                "upcycled FFN is no longer reproduced exactly at the start)."
            )
        logits = self.logits(x)
        if self.order == "softmax_topk":
            probs, chosen, weights = kernel.topk_routing(
                logits, self.top_k, bias=self.balancing_bias, renormalize=self.renormalize
            )
            return self.token_choice_plan(logits, chosen, weights, probs)
        chosen = self.select(logits)
        weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
        return self.token_choice_plan(logits, chosen, weights)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, order={self.order!r}, capacity_factor={self.capacity_factor}"


class SwitchRouter(TopKRouter):
    """Switch Transformer (Fedus 2021): top-1, the output scaled by the expert's probability."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, **options: Any) -> None:
        if top_k != 1:
            raise ConfigError(
                f"router 'switch' sends each token to exactly one expert: top_k must be 1, got {top_k}."
            )
        super().__init__(d_model, num_experts, 1, renormalize=False, **options)


class ExpertChoiceRouter(LearnedRouter):
    """Expert choice (Zhou 2022): each expert takes its ``ceil(capacity_factor * N * k / E)`` best tokens,
    weighted by the token's probability for it. Perfectly balanced, but a token's routing depends on the
    other tokens in the batch, so it is not causal: use it where that is acceptable (encoders)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, **options: Any) -> None:
        options.setdefault("capacity_factor", 1.0)
        options.setdefault("balance_loss_weight", 0.0)
        if options["capacity_factor"] is None:
            raise ConfigError("router 'expert_choice' needs a capacity_factor (it has no dropless mode).")
        if options.get("bias_balancing") is True or "bias_update_rate" in options:  # other values: the base's
            raise ConfigError(
                "router 'expert_choice' is balanced by construction; bias_balancing and bias_update_rate do "
                "not apply."
            )
        super().__init__(d_model, num_experts, top_k, **options)

    @property
    def causal(self) -> bool:
        """An expert takes its best tokens of the whole batch: a position's routing depends on later ones."""
        return False

    @property
    def experts_per_token(self) -> float:
        """Each expert takes ``capacity_factor * k / E`` of the tokens: a token runs that many on average."""
        assert self.capacity_factor is not None  # refused above
        return min(self.capacity_factor * self.top_k, self.num_experts)  # an expert takes each token once

    def forward(self, x: torch.Tensor, kernel: Kernel) -> RoutingPlan:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        n = x.shape[0]
        capacity = min(n, self.capacity(n) or n)
        # torch.topk: which of equal probabilities an expert takes is torch's choice (a stable sort of all
        # N tokens, to take them in token order, cost 1.3x to 3.2x on an H100 at 16K-64K tokens).
        weights, tokens = torch.topk(probs.t(), capacity, dim=-1)  # [E, C]
        experts = torch.arange(self.num_experts, device=x.device).repeat_interleave(capacity)
        losses = self.losses(logits, probs, experts)
        return RoutingPlan(
            tokens.reshape(-1), experts, weights.reshape(-1), n, self.num_experts, probs, 0, losses
        )


class HashRouter(RouterBase):
    """Parameter-free routing: a fixed random projection (seeded) of the token features picks its k experts,
    each weighted 1/k. A content hash, since an FFN sees hidden states, not token ids (cf. Roller 2021)."""

    projection: torch.Tensor  # [E, d] buffer

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, *, seed: int | None = None, **options: Any
    ) -> None:
        for name in ("balance_loss_weight", "z_loss_weight"):
            options.setdefault(name, 0.0)
        super().__init__(d_model, num_experts, top_k, **options)
        # From torch's RNG by default, which a conversion seeds per site from the recipe's seed (as every
        # learned router's weights); ``seed=`` fixes the projection itself.
        if seed is not None:  # the range torch.Generator.manual_seed takes
            check_positive_int("seed", seed, minimum=-(2**63), maximum=2**64 - 1)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        projection = torch.randn(num_experts, d_model, generator=generator) / math.sqrt(d_model)
        self.register_buffer("projection", projection)

    @property
    def weights_sum_to_one(self) -> bool:
        """Weights 1/k for each of the k picks, and dropless without a capacity."""
        return self.capacity_factor is None

    def forward(self, x: torch.Tensor, kernel: Kernel) -> RoutingPlan:
        scores = (x @ self.projection.to(x.dtype).t()).float()
        chosen = torch.topk(scores, self.top_k, dim=-1).indices
        weights = torch.full(chosen.shape, 1.0 / self.top_k, device=x.device, dtype=torch.float32)
        return self.token_choice_plan(scores, chosen, weights)


@hookimpl
def register_routers(register: RouterRegister) -> None:
    register("topk", TopKRouter, description="token choice: top-k experts per token (softmax/renormalised)")
    register("switch", SwitchRouter, description="Switch Transformer top-1")
    register("expert_choice", ExpertChoiceRouter, description="each expert picks its top tokens (not causal)")
    register("hash", HashRouter, description="fixed random-projection hash, uniform weights, no parameters")
