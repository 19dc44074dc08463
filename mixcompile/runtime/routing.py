"""Routing plans and the base class of MoE routers.

A router turns token features ``[N, d]`` into a :class:`RoutingPlan`: the list of (token, expert, weight)
triples that are kept. A list of pairs (rather than a dense ``[N, k]`` top-k table) describes token choice,
expert choice, capacity drops and hashing alike, and is exactly what a grouped-GEMM kernel consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mixcompile.errors import ConfigError, PluginError, check_positive_int


@dataclass
class RoutingPlan:
    token_index: torch.Tensor  # [P] int64: row of the flattened input
    expert_index: torch.Tensor  # [P] int64
    weight: torch.Tensor  # [P] floating, differentiable: the combine weight of the pair
    num_tokens: int
    num_experts: int
    probs: torch.Tensor | None = None  # [N, E] router probabilities, for balance loss and statistics
    dropped_assignments: int = 0  # token-choice picks discarded because an expert was full
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already scaled by their weights


def fixed_bincount(index: torch.Tensor, length: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=length)`` for indices below ``length``, always ``[length]`` long.

    bincount's length depends on the largest index, so ``torch.compile`` cannot trace it; this can.
    """
    return torch.zeros(length, dtype=torch.long, device=index.device).index_add(
        0, index, torch.ones_like(index, dtype=torch.long)
    )


def validate_plan(plan: object, *, source: str, num_tokens: int, num_experts: int) -> None:
    """Check a plan a router plugin returned; errors name ``source`` (the router and its plugin).

    Under ``torch.compile`` only what tracing sees (types, shapes, dtypes) is checked: the value checks
    read tensors back to the host, a graph break. Blocks therefore validate again in their next eager forward.
    """

    def fail(what: str) -> None:
        raise PluginError(f"{source} returned a malformed RoutingPlan: {what}.")

    if not isinstance(plan, RoutingPlan):
        fail(f"expected a mixcompile.RoutingPlan, got {type(plan).__name__}")
    assert isinstance(plan, RoutingPlan)
    if plan.num_tokens != num_tokens or plan.num_experts != num_experts:
        fail(
            f"it describes {plan.num_tokens} tokens x {plan.num_experts} experts, "
            f"the block has {num_tokens} x {num_experts}"
        )
    fields = {"token_index": plan.token_index, "expert_index": plan.expert_index, "weight": plan.weight}
    for name, tensor in fields.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
            fail(f"{name} must be a 1-D tensor")
    if not plan.token_index.shape[0] == plan.expert_index.shape[0] == plan.weight.shape[0]:
        fail("token_index, expert_index and weight differ in length")
    for name in ("token_index", "expert_index"):
        if fields[name].dtype != torch.int64:
            fail(f"{name} must be int64, got {fields[name].dtype}")
    if not plan.weight.is_floating_point():
        fail(f"weight must be floating point, got {plan.weight.dtype}")
    if torch.compiler.is_compiling() or plan.token_index.numel() == 0:
        return
    if plan.token_index.min() < 0 or plan.token_index.max() >= num_tokens:
        fail(f"token_index out of range [0, {num_tokens})")
    if plan.expert_index.min() < 0 or plan.expert_index.max() >= num_experts:
        fail(f"expert_index out of range [0, {num_experts})")
    if not torch.isfinite(plan.weight).all():
        fail("weight has NaN or inf")
    pairs = plan.token_index * num_experts + plan.expert_index
    if torch.unique(pairs).numel() != pairs.numel():
        fail("a token is routed to the same expert twice")


class Router(nn.Module):
    """Shared machinery of learned routers: gate, jitter, capacity, losses, bias balancing.

    Options (all routers accept them; a router may refuse the ones it cannot honour):

    - ``capacity_factor``: ``None`` is dropless; otherwise each expert takes at most
      ``ceil(capacity_factor * N * top_k / E)`` tokens, the highest-weighted first, the rest are dropped.
    - ``jitter``: multiplicative uniform noise ``x * U(1-jitter, 1+jitter)`` on the router input in training
      (Switch Transformer).
    - ``balance_loss_weight``: Switch load-balancing loss ``E * sum_i f_i * P_i`` (``f_i`` the fraction of
      top-k picks going to expert i, ``P_i`` its mean probability), times this weight.
    - ``z_loss_weight``: ST-MoE router z-loss ``mean(logsumexp(logits)^2)``, times this weight.
    - ``bias_balancing``: DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the scores
      for *selection only*; :func:`mixcompile.update_routing_bias` nudges it by ``bias_update_rate`` toward
      balance after each optimiser step.
    - ``init_std``: the gate's initial weights are ``N(0, init_std)``; 0 gives a zero router (uniform
      weights; ties broken by expert index).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ConfigError(
                f"top_k ({top_k}) must be <= num_experts ({num_experts}): a token cannot use an expert twice."
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}.")
        for name, value in (
            ("jitter", jitter),
            ("balance_loss_weight", balance_loss_weight),
            ("z_loss_weight", z_loss_weight),
            ("bias_update_rate", bias_update_rate),
            ("init_std", init_std),
        ):
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}.")
        if jitter >= 1:
            raise ConfigError(
                f"jitter must be < 1 (it scales inputs by U(1-jitter, 1+jitter)), got {jitter}."
            )
        self.capacity_factor = capacity_factor
        self.jitter = float(jitter)
        self.balance_loss_weight = float(balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.bias_update_rate = float(bias_update_rate)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, init_std) if init_std > 0 else self.gate.weight.zero_()
        self.bias_balancing = bool(bias_balancing)
        if self.bias_balancing:
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            self.register_buffer("load_since_update", torch.zeros(num_experts))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        return self.gate(x).float()

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices ``[N, k]`` from scores, with the balancing bias added for selection only."""
        if self.bias_balancing:
            scores = scores + self.selection_bias
        return torch.topk(scores, self.top_k, dim=-1).indices

    def token_choice_plan(
        self,
        logits: torch.Tensor,
        chosen: torch.Tensor,
        weights: torch.Tensor,
        probs: torch.Tensor | None = None,
    ) -> RoutingPlan:
        """Build a plan from per-token picks ``chosen [N, k]`` and their ``weights [N, k]``; ``probs`` is
        ``softmax(logits)`` where the router has it already."""
        n, k = chosen.shape
        token = torch.arange(n, device=chosen.device).repeat_interleave(k)
        expert = chosen.reshape(-1)
        weight = weights.reshape(-1)
        if probs is None:
            probs = torch.softmax(logits, dim=-1)
        losses = self.losses(logits, probs, expert)
        if self.bias_balancing and self.training:
            with torch.no_grad():
                self.load_since_update += fixed_bincount(expert, self.num_experts).float()
        dropped = 0
        capacity = self.capacity(n)
        if capacity is not None:
            keep = _within_capacity(expert, weight.detach(), capacity, self.num_experts)
            kept = keep.nonzero().squeeze(1)  # the one data-dependent size (a graph break under compile)
            dropped = keep.numel() - kept.numel()
            token, expert, weight = token[kept], expert[kept], weight[kept]
        return RoutingPlan(token, expert, weight, n, self.num_experts, probs, dropped, losses)

    def losses(
        self, logits: torch.Tensor, probs: torch.Tensor, expert: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self.balance_loss_weight > 0:
            counts = fixed_bincount(expert, self.num_experts).to(probs.dtype)
            fraction = counts / counts.sum().clamp_min(1)
            losses["balance"] = self.balance_loss_weight * switch_balance_loss(fraction, probs)
        if self.z_loss_weight > 0:
            losses["z"] = self.z_loss_weight * router_z_loss(logits)
        return losses

    @torch.no_grad()
    def update_bias(self) -> None:
        """One DeepSeek-V3 step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if not self.bias_balancing:
            return
        load = self.load_since_update
        if load.sum() > 0:
            self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


def switch_balance_loss(fraction: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i * P_i``; 1 when routing is uniform, E when everything goes to one expert."""
    return probs.shape[-1] * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


def _within_capacity(
    expert: torch.Tensor, priority: torch.Tensor, capacity: int, num_experts: int
) -> torch.Tensor:
    """Mask of the pairs kept when each expert takes its ``capacity`` highest-priority pairs."""
    by_priority = torch.argsort(priority, descending=True, stable=True)
    by_expert = by_priority[torch.argsort(expert[by_priority], stable=True)]
    counts = fixed_bincount(expert, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(expert.numel(), device=expert.device) - starts[expert[by_expert]]
    keep = torch.zeros_like(expert, dtype=torch.bool)
    keep[by_expert] = rank < capacity
    return keep
