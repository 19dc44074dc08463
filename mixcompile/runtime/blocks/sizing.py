"""Expert sizes and FLOPs per token: the one place sizing is computed, for blocks and the compiler."""

from __future__ import annotations

from mixcompile.errors import ConfigError, check_positive_int
from mixcompile.types import Sizing, Strategy


def flop_matched_hidden(
    strategy: Strategy,
    d_ff: int,
    *,
    num_experts: int,
    top_k: int | None = None,
    group_size: int | None = None,
) -> int:
    """MoE: each token runs ``top_k`` experts (count shared experts in: DeepSeekMoE's ``k + S``), so
    ``h = d_ff / top_k``.
    MoT: each group of ``G`` tokens runs all ``E`` experts once, so ``h = d_ff * G / E`` (the paper's sizing).
    """
    check_positive_int("d_ff", d_ff)
    check_positive_int("num_experts", num_experts)
    if strategy == "moe":
        k = check_positive_int("top_k", top_k)
        numerator, denominator = d_ff, k
        formula = f"d_ff / active experts per token (top_k, and shared experts) = {d_ff} / {k}"
    elif strategy == "mot":
        g = check_positive_int("group_size", group_size)
        numerator, denominator = d_ff * g, num_experts
        formula = f"d_ff * group_size / num_experts = {d_ff} * {g} / {num_experts}"
    else:
        raise ConfigError(f"strategy must be 'moe' or 'mot', got {strategy!r}.")
    if numerator % denominator:
        raise ConfigError(f"flop-matched expert size {formula} is not an integer; choose sizes that divide.")
    return numerator // denominator


def expert_hidden(
    strategy: Strategy, d_ff: int, *, sizing: Sizing, num_experts: int, top_k: int, group_size: int
) -> int:
    """The hidden size of each expert replacing a dense FFN of width ``d_ff``: ``same`` keeps it, ``split``
    divides it among the experts (MoEfication), ``flop`` keeps the experts' FLOPs per token equal to dense
    (the block's router or mixing adds its own: see :func:`sparse_flops`)."""
    if sizing == "same":
        return d_ff
    if sizing == "split":
        if d_ff % num_experts:
            raise ConfigError(
                f"sizing 'split' gives each expert hidden / num_experts, but the hidden size {d_ff} is not "
                f"divisible by num_experts={num_experts}."
            )
        return d_ff // num_experts
    if sizing == "flop":
        return flop_matched_hidden(
            strategy, d_ff, num_experts=num_experts, top_k=top_k, group_size=group_size
        )
    raise ConfigError(f"sizing must be 'same', 'split' or 'flop', got {sizing!r}.")


def sparse_flops(
    strategy: Strategy,
    d: int,
    d_hidden: int,
    *,
    gated: bool,
    num_experts: int,
    top_k: float,
    group_size: int,
) -> int:
    """FLOPs per token (a multiply-add is 2). MoE runs ``top_k`` experts per token on average (shared ones
    included; expert choice runs ``capacity_factor * k``) and a router; MoT mixes each group of G tokens
    into one token per expert, runs every expert once per group, and unmixes."""
    e = num_experts
    expert = ffn_flops(d, d_hidden, gated=gated)
    if strategy == "moe":
        return 2 * d * e + round(top_k * expert)
    return 2 * d * e + 2 * (2 * e * d) + e * expert // group_size


def ffn_flops(d: int, d_hidden: int, *, gated: bool) -> int:
    """FLOPs per token (a multiply-add is 2) of one FFN's matrix products: a dense FFN's, or one expert's."""
    return 2 * d * d_hidden * (3 if gated else 2)
