"""Routing plans and the base class of MoE routers.

A router turns token features ``[N, d]`` into a :class:`RoutingPlan`: the list of (token, expert, weight)
triples that are kept. A list of pairs (rather than a dense ``[N, k]`` top-k table) describes token choice,
expert choice, capacity drops and hashing alike, and is exactly what a grouped-GEMM kernel consumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from mixcompile.errors import ConfigError, check_bool, check_number, check_positive_int

if TYPE_CHECKING:
    from mixcompile.runtime.kernels import Kernel


@dataclass
class RoutingPlan:
    """What a router returns for one MoE forward: the (token, expert, weight) pairs that are kept, with the
    router's probabilities and losses for balancing and statistics."""

    token_index: torch.Tensor  # [P] int64: row of the flattened input
    expert_index: torch.Tensor  # [P] int64
    weight: torch.Tensor  # [P] floating, differentiable: the combine weight of the pair
    num_tokens: int
    num_experts: int
    probs: torch.Tensor | None = None  # [N, E] router probabilities, for balance loss and statistics
    dropped_assignments: int = 0  # token-choice picks discarded because an expert was full
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already scaled by their weights
    # k when the plan lists exactly k pairs per token, token by token (token_index is
    # arange(N).repeat_interleave(k): dropless token choice), so kernels need not sort the pairs by token.
    # Checked against token_index in every eager forward; None says nothing.
    pairs_per_token: int | None = None
    # Set by RouterBase.token_choice_plan: the picks it was given, the index tensors it made of them, and
    # the three's versions then (None for inference tensors, which have none), so a block can tell that the
    # indices are a routing step's own, untouched since. Not part of a plan's value.
    listed_from: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int] | None] | None = field(
        default=None, repr=False, compare=False
    )


def fixed_bincount(index: torch.Tensor, length: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=length)`` for indices below ``length``, always ``[length]`` long.

    bincount's length depends on the largest index, so ``torch.compile`` cannot trace it; this can.
    """
    return torch.zeros(length, dtype=torch.long, device=index.device).index_add(
        0, index, torch.ones_like(index, dtype=torch.long)
    )


@runtime_checkable
class Router(Protocol):
    """What a MoE block needs of a router plugin (which must also be an ``nn.Module``, so its parameters
    train with the model): ``router(x [N, d], kernel) -> RoutingPlan``. The kernel is the block's, so a
    router runs its device work (the top-k step) through it: ``kernel.topk_routing(...)``.

    Optionally, ``weights_sum_to_one`` (a bool, False when absent; see :attr:`RouterBase.weights_sum_to_one`):
    True promises that every token's weights sum to 1 and none is dropped, so that ``convert`` compares the
    blocks whose experts start as copies of the dense FFN with that FFN. Optionally ``causal`` (a bool, True
    when absent; see :attr:`RouterBase.causal`): False warns where a converted model generates. Optionally
    ``experts_per_token`` (a float, ``top_k`` when absent; see :attr:`RouterBase.experts_per_token`), for
    FLOP counts."""

    num_experts: int
    top_k: int

    def __call__(self, x: torch.Tensor, kernel: Kernel) -> RoutingPlan: ...


class RouterBase(nn.Module):
    """Shared machinery of routers: capacity, the plan from per-token picks, the auxiliary losses.

    Options (every router built on it accepts them; a router may refuse the ones it cannot honour):

    - ``capacity_factor``: ``None`` is dropless; otherwise each expert takes at most
      ``ceil(capacity_factor * N * top_k / E)`` tokens, the highest-weighted first, the rest are dropped.
    - ``balance_loss_weight``: Switch load-balancing loss ``E * sum_i f_i * P_i`` (``f_i`` the fraction of
      top-k picks going to expert i, ``P_i`` its mean probability), times this weight.
    - ``z_loss_weight``: ST-MoE router z-loss ``mean(logsumexp(logits)^2)``, times this weight.

    The losses are computed in training mode only (``router.train()``, as a model's ``train()`` sets): an
    evaluation or generation forward would compute about fifteen small tensors per block that no backward
    uses, host time on every decoded token.
    """

    bias_balancing = False  # LearnedRouter may turn it on
    load_since_update: torch.Tensor  # [E] buffer, registered when bias_balancing is on

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float | None = None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ConfigError(top_k_above_experts(f"top_k={top_k}", f"num_experts={num_experts}"))
        if capacity_factor is not None:
            check_number("capacity_factor", capacity_factor, above=0, hint="None is dropless.")
        self.capacity_factor = capacity_factor
        self.balance_loss_weight = check_number("balance_loss_weight", balance_loss_weight, minimum=0)
        self.z_loss_weight = check_number("z_loss_weight", z_loss_weight, minimum=0)

    @property
    def weights_sum_to_one(self) -> bool:
        """Whether every token's weights sum to 1 and none of its pairs is dropped (no capacity), for every
        input: then a block whose experts are copies of one FFN computes that FFN, and ``convert`` checks
        each such block, and the converted model, against the dense one. False unless a router says so; a
        router that overrides it must keep the promise (a wrong True fails conversion with a
        ``VerificationError``)."""
        return False

    @property
    def causal(self) -> bool:
        """Whether a token's routing depends only on that token (and the batch before it), so that a model
        that generates routes a decoded token as training routed it. True unless a router says otherwise
        (expert choice ranks each expert's tokens over the whole batch)."""
        return True

    @property
    def experts_per_token(self) -> float:
        """How many experts a token runs on average, for FLOP counts: ``top_k`` (at most: a capacity may drop
        some) unless a router says otherwise (expert choice: ``capacity_factor * top_k``)."""
        return float(self.top_k)

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

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
        if self.bias_balancing and self.training and not _recomputing():
            with torch.no_grad():
                self.load_since_update += fixed_bincount(expert, self.num_experts).float()
        # Capacity is a training device (balanced expert loads): in eval every token is routed, so a
        # sequence's output never depends on the rest of its batch (padding included) and cached generation
        # equals uncached.
        capacity = self.capacity(n) if self.training else None
        if capacity is None:
            plan = RoutingPlan(
                token, expert, weight, n, self.num_experts, probs, 0, losses, pairs_per_token=k
            )
            if not torch.compiler.is_compiling():  # read by eager forwards only
                inference = chosen.is_inference()  # torch.inference_mode: no version to read
                versions = None if inference else (chosen._version, token._version, expert._version)
                plan.listed_from = (chosen, token, expert, versions)
            return plan
        if expert.is_meta:  # shape inference: how many pairs fit is a value, which a meta tensor lacks
            return RoutingPlan(token, expert, weight, n, self.num_experts, probs, 0, losses)
        keep = _within_capacity(expert, weight.detach(), capacity, self.num_experts)
        kept = keep.nonzero().squeeze(1)  # the one data-dependent size (a graph break under compile)
        dropped = keep.numel() - kept.numel()
        token, expert, weight = token[kept], expert[kept], weight[kept]
        return RoutingPlan(token, expert, weight, n, self.num_experts, probs, dropped, losses)

    def losses(
        self, logits: torch.Tensor, probs: torch.Tensor, expert: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if not self.training:
            return losses
        if self.balance_loss_weight > 0:
            counts = fixed_bincount(expert, self.num_experts).to(probs.dtype)
            fraction = counts / counts.sum().clamp_min(1)
            losses["balance"] = self.balance_loss_weight * switch_balance_loss(fraction, probs)
        if self.z_loss_weight > 0:
            losses["z"] = self.z_loss_weight * router_z_loss(logits)
        return losses


def _recomputing() -> bool:
    """Whether this forward runs inside backward: activation checkpointing recomputing it, whose tokens the
    first run counted already (so does any forward a backward hook runs, which is not counted either)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_BALANCING_STATE = ("selection_bias", "load_since_update")  # kept in float32 or wider (LearnedRouter._apply)


class LearnedRouter(RouterBase):
    """A router with a learned gate ``W_g [d, E]``: the base of the built-in token-choice routers.

    Options besides :class:`RouterBase`'s:

    - ``jitter``: multiplicative uniform noise ``x * U(1-jitter, 1+jitter)`` on the router input in training
      (Switch Transformer).
    - ``bias_balancing``: DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the scores
      for *selection only*; :func:`mixcompile.update_routing_bias` nudges it by ``bias_update_rate``
      (default 1e-3; refused without ``bias_balancing=True``, where it would do nothing) toward balance
      after each optimiser step.
    - ``init_std``: the gate's initial weights are ``N(0, init_std)``; 0 gives a zero router (uniform
      weights; ties broken by expert index).
    """

    selection_bias: torch.Tensor  # [E] buffer, registered when bias_balancing is on

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        jitter: float = 0.0,
        bias_balancing: bool = False,
        bias_update_rate: float | None = None,
        init_std: float = 0.02,
        capacity_factor: float | None = None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            top_k,
            capacity_factor=capacity_factor,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.jitter = check_number(
            "jitter", jitter, minimum=0, below=1, hint="It scales inputs by U(1-jitter, 1+jitter)."
        )
        rate = 1e-3 if bias_update_rate is None else bias_update_rate
        self.bias_update_rate = check_number("bias_update_rate", rate, minimum=0)
        self.bias_balancing = check_bool("bias_balancing", bias_balancing)
        if bias_update_rate is not None and not self.bias_balancing:
            raise ConfigError(
                f"bias_update_rate={bias_update_rate!r} only applies with bias_balancing=True (it is the "
                "step of the balancing bias); set bias_balancing=True, or leave bias_update_rate out."
            )
        self.gate = gate_layer(d_model, num_experts, init_std)
        if self.bias_balancing:
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            self.register_buffer("load_since_update", torch.zeros(num_experts))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LearnedRouter:
        """Moves apply to the balancing state, casts to a narrower float do not (``model.to(torch.bfloat16)``,
        ``.half()``): in bfloat16 the token counts lost units past 256 and a bias of 0.5 no longer moved by
        the default 1e-3 steps."""
        kept = {name: getattr(self, name) for name in _BALANCING_STATE if name in self._buffers}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype.itemsize < old.dtype.itemsize:
                self._buffers[name] = old.to(new.device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``score(x)`` in float32 (float64 for a float64 block), with the jitter on ``x`` in training: a
        router scoring tokens its own way overrides :meth:`score` and keeps the jitter."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        scores = self.score(x)
        return scores.to(torch.promote_types(scores.dtype, torch.float32))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` router scores of the tokens ``x [N, d]``: the linear gate."""
        scores: torch.Tensor = self.gate(x)
        return scores

    @property
    def balancing_bias(self) -> torch.Tensor | None:
        """The selection bias of aux-loss-free balancing, or ``None`` when it is off."""
        return self.selection_bias if self.bias_balancing else None

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices ``[N, k]`` from scores, with the balancing bias added for selection only."""
        if self.bias_balancing:
            scores = scores + self.selection_bias
        return top_indices(scores, self.top_k)

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
    """``E * sum_i f_i * P_i``; 1 when routing is uniform, E when everything goes to one expert.

    0 without tokens (an empty batch, e.g. a data-parallel rank with nothing left), still a function of
    ``probs``: the router's parameters get a (zero) gradient, as DDP expects of every rank."""
    return probs.shape[-1] * torch.sum(fraction * _mean_over_tokens(probs))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean(logsumexp(logits)^2)`` over tokens; 0 (with a gradient path) without tokens."""
    return _mean_over_tokens(torch.logsumexp(logits, dim=-1).square())


def _mean_over_tokens(t: torch.Tensor) -> torch.Tensor:
    """``t.mean(dim=0)``, but the sum (zeros, still in the autograd graph) over no rows instead of NaN."""
    return t.mean(dim=0) if t.shape[0] > 0 else t.sum(dim=0)


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


def topk_routing(
    logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None = None, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k routing step in plain PyTorch: ``(probs [N, E], chosen [N, k], weights [N, k])``.

    Softmax over all experts, pick the top ``k`` of ``probs + bias`` (the bias, for aux-loss-free balancing,
    steers selection only), keep their probabilities, renormalised to sum to 1 unless ``renormalize=False``.
    A fused kernel's ``topk_routing`` must compute exactly this.
    """
    probs = torch.softmax(logits, dim=-1)
    scores = probs if bias is None else probs + bias
    chosen = top_indices(scores, top_k)
    weights = probs.gather(-1, chosen)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, chosen, weights


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest scores of each row, equal scores in index order (a zero router picks
    experts ``0..k-1``): ``torch.topk`` leaves ties unordered, and the fused kernel breaks them by index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def gate_layer(d_model: int, num_experts: int, init_std: float) -> nn.Linear:
    """A bias-free ``d_model -> num_experts`` scoring layer (a router's gate, a mixer's controller) with
    ``N(0, init_std)`` weights; 0 gives all-zero weights (uniform scores)."""
    std = check_number("init_std", init_std, minimum=0)
    layer = nn.Linear(d_model, num_experts, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0.0, std) if std > 0 else layer.weight.zero_()
    return layer


def top_k_above_experts(top_k: str, num_experts: str) -> str:
    """The one wording of ``top_k > num_experts``: the router's, and the command line's (naming its flags),
    which refuses it before loading a model."""
    why = "top_k must be <= num_experts (a token cannot use an expert twice)"
    return f"{top_k} is more than {num_experts}: {why}."
