"""The fused top-k routing step: softmax over experts, the balancing bias for selection, top-k and
renormalisation, in one pass over the router logits (one read of ``[N, E]``, one write of the probabilities,
``[N, k]`` picks and weights) instead of the four or five kernels the PyTorch code launches.

The backward is elementwise and done in PyTorch: with ``w = p[chosen] / S`` (``S`` the chosen mass),
``dp[chosen] += (dw - <dw, w>) / S`` (or ``dw`` without renormalisation), then the softmax backward
``dlogits = p * (dp - <p, dp>)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixcompile_plugins.triton import MAX_ROUTED_EXPERTS, cdiv, next_power_of_2


@triton.jit
def _topk_route_kernel(
    logits_ptr, bias_ptr, probs_ptr, chosen_ptr, weights_ptr, N, E,
    K: tl.constexpr, K_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < E)[None, :]
    offsets = rows.to(tl.int64)[:, None] * E + cols[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=-float("inf")).to(tl.float32)
    logits = tl.where(row_ok[:, None], logits, 0.0)  # rows past N: a finite softmax, never stored
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = shifted / tl.sum(shifted, axis=1)[:, None]
    tl.store(probs_ptr + offsets, probs, mask=mask)

    scores = probs
    if HAS_BIAS:
        scores += tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    scores = tl.where(mask, scores, -float("inf"))
    slots = tl.arange(0, K_POW2)
    chosen = tl.zeros((BLOCK_N, K_POW2), tl.int32)
    weights = tl.zeros((BLOCK_N, K_POW2), tl.float32)
    for j in tl.static_range(K):  # the k best by repeated arg-max; a picked expert drops out
        best = tl.argmax(scores, axis=1)
        picked = cols[None, :] == best[:, None]
        weight = tl.sum(tl.where(picked, probs, 0.0), axis=1)
        chosen = tl.where(slots[None, :] == j, best[:, None], chosen)
        weights = tl.where(slots[None, :] == j, weight[:, None], weights)
        scores = tl.where(picked, -float("inf"), scores)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    out_mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(chosen_ptr + out, chosen.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out, weights, mask=out_mask)


def topk_route(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [N, E] fp32, chosen [N, k] int64, weights [N, k] fp32)`` from ``logits [N, E]``."""
    n, e = logits.shape
    if e > MAX_ROUTED_EXPERTS:
        raise ValueError(f"the fused routing step handles up to {MAX_ROUTED_EXPERTS} experts, got {e}.")
    logits = logits.contiguous()
    probs = torch.empty(n, e, device=logits.device, dtype=torch.float32)
    chosen = torch.empty(n, k, device=logits.device, dtype=torch.int64)
    weights = torch.empty(n, k, device=logits.device, dtype=torch.float32)
    if n == 0:
        return probs, chosen, weights
    block_e = next_power_of_2(e)
    block_n = max(1, min(64, 2048 // block_e))
    _topk_route_kernel[(cdiv(n, block_n),)](
        logits, logits if bias is None else bias.contiguous(), probs, chosen, weights, n, e,
        K=k, K_POW2=next_power_of_2(k), HAS_BIAS=bias is not None, RENORMALIZE=renormalize,
        BLOCK_N=block_n, BLOCK_E=block_e,
    )  # fmt: skip
    return probs, chosen, weights


def topk_route_backward(
    d_probs: torch.Tensor | None,
    d_weights: torch.Tensor | None,
    probs: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    """The logits' gradient (see the module docstring)."""
    dp = torch.zeros_like(probs) if d_probs is None else d_probs.float().clone()
    if d_weights is not None:
        d_weights = d_weights.float()
        if renormalize:
            mass = probs.gather(-1, chosen).sum(-1, keepdim=True)
            d_chosen = (d_weights - (d_weights * weights).sum(-1, keepdim=True)) / mass
        else:
            d_chosen = d_weights
        dp.scatter_add_(-1, chosen, d_chosen)
    return probs * (dp - (probs * dp).sum(-1, keepdim=True))
