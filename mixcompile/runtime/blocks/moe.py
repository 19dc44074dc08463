"""The Mixture-of-Experts block: a router picks experts per token, a kernel runs them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mixcompile.errors import ConfigError, PluginError, UnknownNameError, check_positive_int
from mixcompile.plugins.build import Source, build_plugin, call_plugin, source_text
from mixcompile.plugins.manager import lookup
from mixcompile.runtime.blocks.base import Block, Describe, check_plugin_options
from mixcompile.runtime.checks import check_output, check_picks, check_routing_plan
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.runtime.kernels import Kernel
from mixcompile.runtime.routing import Router, RoutingPlan, fixed_bincount, top_k_above_experts
from mixcompile.types import Activation


class ExpertRunner(Protocol):
    """Runs a plan on experts held elsewhere too (expert parallelism): ``num_experts`` is how many the
    plans name, all ranks' together."""

    num_experts: int

    def __call__(
        self, x: torch.Tensor, plan: RoutingPlan, experts: StackedExperts, kernel: Kernel
    ) -> torch.Tensor: ...


class MoEBlock(Block):
    """``[..., d] -> [..., d]``: ``y = sum_e w_e(x) * expert_e(x) + sum_s shared_s(x)``.

    ``router_options`` go to the router plugin (``capacity_factor``, ``jitter``, loss weights, ... see
    :class:`mixcompile.Router`). ``num_shared_experts`` always-on experts (DeepSeekMoE) are added to every
    token with weight 1. ``hidden_dropout`` is applied to every expert's hidden activations in training (the
    dense FFN's dropout between its projections, kept by ``convert``). After a forward, ``last_aux_loss``
    holds the weighted router losses and ``last_stats`` the expert load, dropped tokens and routing entropy.
    """

    kind = "moe"

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        top_k: int = 2,
        activation: Activation = "gelu",
        gated: bool = False,
        bias: bool = False,
        router: str = "topk",
        router_options: Mapping[str, Any] | None = None,
        num_shared_experts: int = 0,
        hidden_dropout: float = 0.0,
        kernel: str = "auto",
        site: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(kernel, site)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:  # here, not only in RouterBase: a third party's router may not check it
            raise ConfigError(top_k_above_experts(f"top_k={top_k}", f"num_experts={num_experts}"))
        check_positive_int("num_shared_experts", num_shared_experts, minimum=0)
        check_plugin_options("router_options", router_options)
        self.top_k = top_k
        spec: dict[str, Any] = {
            "activation": activation,
            "gated": gated,
            "bias": bias,
            "hidden_dropout": hidden_dropout,
            "device": device,
            "dtype": dtype,
        }
        self.experts = StackedExperts(num_experts, d_model, d_hidden, **spec)
        self.shared_experts = (
            StackedExperts(num_shared_experts, d_model, d_hidden, **spec) if num_shared_experts else None
        )
        self.router_name = router
        self.router = build_plugin(
            "router",
            router,
            d_model,
            num_experts,
            top_k,
            options=router_options,
            expected=(nn.Module, Router),
            where=site,
        )
        self.router.to(device=device, dtype=dtype)
        self._router_source = Describe(self, "router", router)
        built_for = getattr(self.router, "num_experts", num_experts)
        if built_for != num_experts:  # its plans would name experts the block does not have, or skip some
            raise PluginError(
                f"{self._router_source()} was built for num_experts={built_for!r}, but the block has "
                f"{num_experts} experts: a router factory must route over the num_experts it is given."
            )
        self.last_aux_loss: torch.Tensor | None = None
        # Set by mixcompile.distributed.parallelize: runs the plan on experts sharded over ranks.
        self.expert_parallel: ExpertRunner | None = None
        self.from_mot = False  # made from a MoT block by mixcompile.to_token_choice (a save records it)
        self.choose_kernels()

    def _router_is_builtin(self) -> bool:
        """Whether the router is a built-in plugin's own class (not a subclass of it), as registered."""
        try:
            registration = lookup("router", self.router_name)
        except UnknownNameError:  # its plugin unregistered since the block was built
            return False
        return registration.builtin and type(self.router) is registration.factory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, "[..., d]", ok_rank=isinstance(x, torch.Tensor) and x.ndim >= 2)
        flat = self._compute_input(x.reshape(-1, x.shape[-1]))
        choice = self._kernel(flat)
        kernel = choice.kernel
        if torch.compiler.is_compiling():
            routing_kernel: Kernel = kernel
        else:
            routing_kernel = _RoutingKernel(
                kernel, choice.source, trusted=choice.builtin, router_is_builtin=self._router_is_builtin
            )
        plan = call_plugin(self._router_source, self.router, flat, routing_kernel)
        runner = self.expert_parallel  # sharded, the block holds this rank's experts: plans name all of them
        experts = runner.num_experts if runner is not None else self.experts.num_experts
        check_routing_plan(
            plan,
            source=self._router_source,
            num_tokens=flat.shape[0],
            num_experts=experts,
            in_range=isinstance(routing_kernel, _RoutingKernel) and routing_kernel.listed(plan),
        )
        if runner is not None:
            y = runner(flat, plan, self.experts, kernel)
        else:
            y = check_output(
                call_plugin(choice.source, kernel.moe, flat, plan, self.experts), flat, choice.source
            )
        if self.shared_experts is not None:
            shared_in = flat.unsqueeze(0).expand(self.shared_experts.num_experts, -1, -1)
            y = y + self.shared_experts.batched_forward(shared_in).sum(0)
        loss = sum(plan.aux_losses.values()) if plan.aux_losses else None
        earlier = self.last_aux_loss
        if self._keep_stats(_routing_stats(plan, choice.name)) and earlier is not None:
            loss = earlier if loss is None else earlier + loss  # the forward called the block before
        self.last_aux_loss = loss
        return y.reshape(x.shape)  # in flat's dtype

    def load_dense(
        self,
        dense: DenseFFN,
        init: str = "upcycle",
        generator: torch.Generator | None = None,
        **init_options: Any,
    ) -> None:
        """Fill the routed experts from ``dense`` (see :meth:`Block.load_dense`); shared experts start at
        ``nn.Linear``'s init with a zero output projection, so they add nothing at first and an initializer
        that preserves the dense FFN (``upcycle``) still does. They learn what the routed experts share."""
        super().load_dense(dense, init, generator, **init_options)
        shared = self.shared_experts
        if shared is None or shared.w_in.device.type == "meta":
            return
        shared.reset_parameters(generator)
        with torch.no_grad():
            shared.w_out.zero_()
            if shared.b_out is not None:
                shared.b_out.zero_()

    def __getstate__(self) -> dict[str, Any]:
        """Without the last forward's router loss, which belongs to that forward's autograd graph: a deep
        copy of a model mid-training (EMA, SWA, a second conversion) failed on it ("only graph leaves
        support the deepcopy protocol"), and a pickle would carry it."""
        return {**self.__dict__, "last_aux_loss": None}

    def settings(self) -> dict[str, Any]:
        """``{"token_choice": top_k}`` for a block :func:`mixcompile.to_token_choice` made, so that a load
        replays the switch (``mixcompile.io.loading``), and a kernel set since the block was built."""
        return {**super().settings(), **self._switch()}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        own = {key: value for key, value in settings.items() if key != "kernel"}
        if own != self._switch():
            raise ConfigError(
                f"MoEBlock settings {own} do not match this block ({self._switch() or 'no settings'})."
            )
        super().apply_settings({key: value for key, value in settings.items() if key == "kernel"})

    def _switch(self) -> dict[str, Any]:
        return {"token_choice": self.top_k} if self.from_mot else {}

    def extra_repr(self) -> str:
        return f"router={self.router_name!r}, top_k={self.top_k}, kernel={self.kernel!r}"


@torch.no_grad()
def _routing_stats(plan: Any, kernel_name: str) -> dict[str, Any]:
    """Tensors on the plan's device; :attr:`Block.last_stats` reads them back. Few ops: every forward pays
    for them, a decoded token included (a plan with ``pairs_per_token`` drops no token)."""
    assignments: Any = plan.dropped_assignments
    if plan.pairs_per_token is None:
        dropped: Any = (fixed_bincount(plan.token_index, plan.num_tokens) == 0).sum()
        if dropped.is_meta:  # which picks fit a capacity is a value, which a meta forward lacks: unknown
            assignments = dropped
    else:
        dropped = 0
    stats: dict[str, Any] = {
        "kind": "moe",
        "kernel": kernel_name,
        "tokens": plan.num_tokens,
        "expert_load": fixed_bincount(plan.expert_index, plan.num_experts),
        "dropped_tokens": dropped,
        "dropped_assignments": assignments,
    }
    if plan.probs is not None:  # -sum p log p, 0 where p is 0
        stats["routing_entropy"] = torch.special.entr(plan.probs.float()).sum(-1).mean()
    return stats


class _RoutingKernel:
    """The kernel as a router sees it (eager forwards): a fault in the kernel's routing step
    (``topk_routing``) names the kernel, not the router that called it, and its results are checked where
    they are made: their shapes and dtypes always, and the picks' range for a third party's kernel (one read
    back; a built-in's are in range by construction)."""

    def __init__(
        self, kernel: Kernel, source: Source, *, trusted: bool, router_is_builtin: Callable[[], bool]
    ) -> None:
        self._kernel = kernel
        self._source = source
        self._trusted = trusted
        self._router_is_builtin = router_is_builtin
        # The experts tensor returned, and its version (None for an inference tensor, which has none).
        self._picked: tuple[torch.Tensor, int | None] | None = None

    def listed(self, plan: RoutingPlan) -> bool:
        """Whether ``plan`` lists this forward's routing step's picks as they came out, through
        :meth:`RouterBase.token_choice_plan`, nothing since written into them or its token index: its
        indices are in range by construction, so the block need not read them back to the host (a wait for
        the GPU's queue that cost a third of a 16K-token forward's time on an H100). Under
        ``torch.inference_mode`` the tensors have no versions to show that: a built-in router, which writes
        into nothing it lists, is trusted by the tensors' identity alone."""
        listed, picked = getattr(plan, "listed_from", None), self._picked  # a router may return anything
        if listed is None or picked is None:
            return False
        chosen, token, expert, versions = listed
        if not (chosen is picked[0] and plan.token_index is token and plan.expert_index is expert):
            return False
        if versions is None or picked[1] is None:
            return versions is None and picked[1] is None and self._router_is_builtin()
        unchanged: bool = (chosen._version, token._version, expert._version) == versions
        return picked[1] == versions[0] and unchanged

    def topk_routing(
        self, logits: torch.Tensor, top_k: int, *, bias: torch.Tensor | None = None, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        result = call_plugin(
            self._source, self._kernel.topk_routing, logits, top_k, bias=bias, renormalize=renormalize
        )
        n = logits.shape[0]
        expected = {"probs": (n, logits.shape[1]), "experts": (n, top_k), "weights": (n, top_k)}
        parts = result if isinstance(result, tuple) and len(result) == 3 else None
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in parts or ()]
        if parts is None or got != list(expected.values()) or parts[1].dtype != torch.int64:
            what = (
                f"a {type(result).__name__}"
                if parts is None
                else ", ".join(
                    f"{name} {shape} {getattr(t, 'dtype', type(t).__name__)}"
                    for name, shape, t in zip(expected, got, parts, strict=True)
                )
            )
            raise PluginError(
                f"{source_text(self._source)}: topk_routing returned {what}; expected (probs [N, E], experts "
                f"[N, top_k] int64, weights [N, top_k]) for N={n}, E={logits.shape[1]}, top_k={top_k}."
            )
        experts = parts[1]
        if not self._trusted:
            check_picks(experts, logits.shape[1], self._source)
        self._picked = (experts, None if experts.is_inference() else experts._version)
        return parts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)
