"""Expert hidden sizes that keep the FFN FLOPs per token equal to the dense model's."""

from __future__ import annotations

from mixcompile.errors import ConfigError, check_positive_int


def flop_matched_hidden(
    strategy: str, d_ff: int, *, num_experts: int, top_k: int | None = None, group_size: int | None = None
) -> int:
    """MoE: each token runs ``top_k`` experts, so ``h = d_ff / top_k``.
    MoT: each group of ``G`` tokens runs all ``E`` experts once, so ``h = d_ff * G / E`` (the paper's sizing).
    """
    check_positive_int("d_ff", d_ff)
    check_positive_int("num_experts", num_experts)
    if strategy == "moe":
        k = check_positive_int("top_k", top_k)
        numerator, denominator, formula = d_ff, k, f"d_ff / top_k = {d_ff} / {k}"
    elif strategy == "mot":
        g = check_positive_int("group_size", group_size)
        numerator, denominator = d_ff * g, num_experts
        formula = f"d_ff * group_size / num_experts = {d_ff} * {g} / {num_experts}"
    else:
        raise ConfigError(f"strategy must be 'moe' or 'mot', got {strategy!r}.")
    if numerator % denominator:
        raise ConfigError(f"flop-matched expert size {formula} is not an integer; choose sizes that divide.")
    return numerator // denominator
