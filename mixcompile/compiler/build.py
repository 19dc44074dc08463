"""Size and build the block for each chosen site; count its parameters and FLOPs per token.

All blocks are built (and filled from the dense weights) before the model is touched, so an option that
does not fit one site (``top_k > num_experts``, a hidden size ``split`` cannot divide) fails with that
site's path and leaves the model as it was. ``inspect`` builds the same blocks on the meta device: exact
parameter counts, no memory, no weights.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixcompile.compiler.find import FFNSite
from mixcompile.compiler.recipe import Recipe
from mixcompile.errors import ConfigError, MixcompileError, check_number
from mixcompile.plugins.build import call_plugin_method, describe_plugin
from mixcompile.runtime.blocks import Block, MoEBlock, MoTBlock
from mixcompile.runtime.blocks.sizing import expert_hidden, ffn_flops, sparse_flops
from mixcompile.runtime.experts import StackedExperts, deferred_init
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.types import TokenLayout


@dataclass
class Replacement:
    site: FFNSite
    d_hidden: int
    block: nn.Module
    kernel: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


def build_replacement(
    site: FFNSite, recipe: Recipe, *, meta: bool = False, layout: TokenLayout | None = None
) -> Replacement:
    """The block replacing ``site`` (filled from the dense FFN unless ``meta``); errors name the site.
    ``layout`` is the MoT token layout :mod:`mixcompile.compiler.layout` decided for the site."""
    ffn = site.ffn
    device = torch.device("meta") if meta else ffn.w_in.device
    try:
        d_hidden = _expert_hidden(ffn.d_hidden, recipe)
        block = seeded_block(site, recipe, d_hidden, device, layout=layout)
        if meta:  # a plan (inspect): say what convert would refuse
            _check_initializer(block, ffn, recipe)
        if ffn.w_in.device.type == "meta" and block.kernel != "auto":
            kernel = block.kernel  # a load's replay: checked for the device the weights are loaded to
        else:
            kernel = block.kernel_for(ffn.w_in.device, ffn.w_in.dtype)
    except MixcompileError as exc:
        where = f" at {site.label!r}" if f" at {site.label}" not in str(exc) else ""  # a plugin's names it
        raise exc.prefixed(f"FFN site {site.index}{where}") from exc
    return Replacement(
        site,
        d_hidden,
        block,
        kernel,
        params_before=dense_params(ffn),
        params_after=sum(p.numel() for p in block.parameters()),
        flops_before=dense_flops(ffn),
        flops_after=block_flops(ffn, d_hidden, recipe),
    )


def seeded_block(
    site: FFNSite,
    recipe: Recipe,
    d_hidden: int,
    device: torch.device,
    *,
    layout: TokenLayout | None = None,
) -> Block:
    """The block for ``site``, every random choice drawn from ``recipe.seed`` and the site (:func:`site_seed`;
    ``layout``: the MoT token layout :mod:`mixcompile.compiler.layout` decided for it).

    Routers and mixers are built on the CPU under a forked, seeded RNG (the same weights on every device,
    whatever the global RNG); the experts are allocated on ``device`` uninitialised and filled by the
    initializer, with a seeded CPU generator for its random draws. On the meta device nothing is filled.
    """
    seed = site_seed(recipe.seed, site)
    with torch.random.fork_rng(devices=[]), deferred_init():
        torch.manual_seed(seed)
        block = build_block(site, recipe, d_hidden, layout=layout)
    generator = torch.Generator().manual_seed(seed)
    computed = _computed_buffers(block)
    for experts in block.modules():
        if isinstance(experts, StackedExperts):
            experts.to_empty(device=device)
    block.to(device)
    if device.type == "meta":
        for (module, name), buffer in computed.items():
            module._buffers[name] = buffer
        return block
    block.load_dense(site.ffn, init=recipe.init, generator=generator, **recipe.init_options)
    return block


def _computed_buffers(block: Block) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """The non-persistent buffers of the block's plugins (tables a router computes when built): no saved
    file holds them, so a skeleton keeps them real, as it keeps the base model's."""
    return {
        (module, name): buffer
        for module in block.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name in module._non_persistent_buffers_set
    }


def _check_initializer(block: Block, ffn: DenseFFN, recipe: Recipe) -> None:
    """Run the initializer on meta tensors, computing nothing, so that its own checks (sizes, options)
    refuse here what :func:`convert` would refuse: ``inspect`` said "planned" for them. An initializer that
    needs values to go on (balanced clustering) cannot run on meta; convert runs it for real."""

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to("meta")

    dense = DenseFFN(
        w_in=ffn.w_in.to("meta"),
        w_out=ffn.w_out.to("meta"),
        activation=ffn.activation,
        w_gate=meta(ffn.w_gate),
        b_in=meta(ffn.b_in),
        b_gate=meta(ffn.b_gate),
        b_out=meta(ffn.b_out),
    )
    try:
        with torch.device("meta"):  # what it allocates, too (random draws on a CPU generator then fail: fine)
            block.load_dense(dense, init=recipe.init, generator=torch.Generator(), **recipe.init_options)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a computation meta tensors cannot do, not a refusal
        pass


def site_seed(seed: int, site: FFNSite) -> int:
    """A seed for the site's random draws, hashed from the recipe's seed, the site's module and index: with
    ``seed + index`` layer ``i + 1`` of seed 0 drew what layer ``i`` of seed 1 drew (seed sweeps shared their
    draws), and a second conversion of other layers repeated the first one's."""
    digest = hashlib.sha256(f"{seed}\0{site.label}\0{site.index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes values below 2**63


def active_experts(recipe: Recipe) -> float:
    """Experts a token runs on average: ``top_k`` (``capacity_factor * top_k`` pairs per token under expert
    choice, whose experts each take that share of the tokens, each token once: at most ``num_experts``) plus
    the shared ones, which run for all.

    A capacity_factor the router will refuse (None, a string, NaN, ...) counts as its default 1 here, so
    that the router's own message, when the block is built, is what the user sees (not a TypeError)."""
    k = float(recipe.top_k)
    factor = recipe.router_options.get("capacity_factor", 1.0)
    if recipe.router == "expert_choice":
        with contextlib.suppress(ConfigError):
            k = min(k * check_number("capacity_factor", factor, above=0), recipe.num_experts)
    return k + recipe.num_shared_experts


def _expert_hidden(d_ff: int, recipe: Recipe) -> int:
    active = active_experts(recipe)
    if recipe.strategy == "moe" and recipe.resolved_sizing() == "flop" and not active.is_integer():
        raise ConfigError(
            f"sizing 'flop' divides the hidden size among the experts a token runs, {active:g} here "
            "(expert choice runs capacity_factor * top_k): choose a capacity_factor that makes it whole."
        )
    d_hidden = expert_hidden(
        recipe.strategy,
        d_ff,
        sizing=recipe.resolved_sizing(),
        num_experts=recipe.num_experts,
        top_k=int(active),
        group_size=recipe.group_size,
    )
    _check_init_fits_sizing(d_ff, d_hidden, recipe)
    return d_hidden


def _check_init_fits_sizing(d_ff: int, d_hidden: int, recipe: Recipe) -> None:
    """The built-in copying initializers need one expert size: ``upcycle`` the dense one (sizing ``same``),
    ``split`` ``d_ff / num_experts`` (sizing ``split``). Checked here, where both are known, so that the
    hint names the sizing too (the initializer, which sees sizes only, could suggest a second misfit)."""
    if recipe.init == "upcycle":
        fits, size, sizing = d_hidden == d_ff, f"{d_ff}, the dense one", "same"
    elif recipe.init == "split":
        fits, size, sizing = d_hidden * recipe.num_experts == d_ff, f"{d_ff} / {recipe.num_experts}", "split"
    else:
        return
    if fits:
        return
    raise ConfigError(
        f"init={recipe.init!r} needs experts of hidden size {size} (sizing={sizing!r}), but "
        f"sizing={recipe.resolved_sizing()!r} gives {d_hidden}. Combinations that work: init='upcycle' with "
        "sizing='same', init='split' with sizing='split', init='random' with any sizing."
    )


def build_block(site: FFNSite, recipe: Recipe, d_hidden: int, *, layout: TokenLayout | None = None) -> Block:
    """The block for ``site``, built on the CPU (:func:`seeded_block` moves it where the model lives)."""
    ffn = site.ffn
    shape: dict[str, Any] = {
        "activation": ffn.activation,
        "gated": ffn.gated,
        "bias": ffn.has_bias,
        "hidden_dropout": site.hidden_dropout,
        "kernel": recipe.kernel,
        "site": site.label,
        "device": "cpu",
        "dtype": ffn.w_in.dtype,
    }
    if recipe.strategy == "moe":
        block: Block = MoEBlock(
            ffn.d_model,
            d_hidden,
            recipe.num_experts,
            top_k=recipe.top_k,
            router=recipe.router,
            router_options=recipe.router_options,
            num_shared_experts=recipe.num_shared_experts,
            **shape,
        )
    else:
        block = MoTBlock(
            ffn.d_model,
            d_hidden,
            recipe.num_experts,
            group_size=recipe.group_size,
            mixer=recipe.mixer,
            mixer_options=recipe.mixer_options,
            mode=recipe.mode,
            small_batch=recipe.small_batch,
            layout=layout or site.layout or "batch_first",
            **shape,
        )
    return block


def function_preserving(plan: Replacement) -> bool:
    """Whether the block built for ``plan`` should compute its dense FFN at step 0, read from the built
    block (not from plugin names, so a third party's router or initializer is held to it too): a MoE block
    whose router's weights sum to 1 per token with nothing dropped (``weights_sum_to_one``), whose experts
    are each an exact copy of the FFN, and whose shared experts, if any, start with a zero output."""
    block = plan.block
    return (
        isinstance(block, MoEBlock)
        and _router_weights_sum_to_one(block)
        and experts_copy_dense(block.experts, plan.site.ffn)
        and (block.shared_experts is None or outputs_zero(block.shared_experts))
    )


def _router_weights_sum_to_one(block: MoEBlock) -> bool:
    """The router's ``weights_sum_to_one`` (False when it has none, or anything but True); a property
    that raises is its plugin's bug, named."""

    def source() -> str:  # built only for an error
        return describe_plugin("router", block.router_name, block.site)

    when = "when weights_sum_to_one was read"
    declared = call_plugin_method(source, when, getattr, block.router, "weights_sum_to_one", False)
    return declared is True


def experts_copy_dense(experts: StackedExperts, dense: DenseFFN) -> bool:
    """Whether every expert holds the dense FFN's tensors (in the experts' dtype, as an initializer copies
    them), a bias the FFN lacks being zero."""
    pairs = zip(experts.tensors, dense.tensors, strict=True)
    return all(_every_expert_equals(stacked, single) for stacked, single in pairs)


def _every_expert_equals(stacked: torch.Tensor | None, single: torch.Tensor | None) -> bool:
    if stacked is None:
        return single is None
    if single is None:
        return not bool(stacked.any())
    if stacked.shape[1:] != single.shape:  # experts of another size (split, random)
        return False
    return torch.equal(stacked, single.to(stacked).unsqueeze(0).expand_as(stacked))


def outputs_zero(experts: StackedExperts) -> bool:
    """Whether ``experts`` add nothing to a block's output (a zero output projection and bias)."""
    return not bool(experts.w_out.any()) and (experts.b_out is None or not bool(experts.b_out.any()))


def dense_params(ffn: DenseFFN) -> int:
    tensors = (ffn.w_in, ffn.w_gate, ffn.w_out, ffn.b_in, ffn.b_gate, ffn.b_out)
    return sum(t.numel() for t in tensors if t is not None)


def dense_flops(ffn: DenseFFN) -> int:
    """FLOPs per token (a multiply-add is 2) of the dense FFN's matrix products."""
    return ffn_flops(ffn.d_model, ffn.d_hidden, gated=ffn.gated)


def block_flops(ffn: DenseFFN, d_hidden: int, recipe: Recipe) -> int:
    """FLOPs per token of the block ``recipe`` builds for ``ffn``."""
    return sparse_flops(
        recipe.strategy,
        ffn.d_model,
        d_hidden,
        gated=ffn.gated,
        num_experts=recipe.num_experts,
        top_k=active_experts(recipe),
        group_size=recipe.group_size,
    )


def existing_block_flops(block: MoEBlock | MoTBlock) -> int:
    """FLOPs per token of a sparse block already in the model."""
    experts = block.experts
    if isinstance(block, MoEBlock):
        shared = block.shared_experts.num_experts if block.shared_experts is not None else 0
        routed: float = getattr(block.router, "experts_per_token", block.top_k)  # expert choice: c * k
        top_k, group_size = routed + shared, 1
    else:
        top_k, group_size = 0.0, block.group_size
    return sparse_flops(
        block.kind,
        experts.d_model,
        experts.d_hidden,
        gated=experts.gated,
        num_experts=experts.num_experts,
        top_k=top_k,
        group_size=group_size,
    )
