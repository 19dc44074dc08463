"""The MoE forward and backward passes from the grouped GEMMs.

Forward: gather-GEMM-activation (``grouped.up``), the down projection into one row per pair, and a combine
that sums each token's pairs, weighted, in a fixed order (no atomics, so results are deterministic).
Backward reuses the saved pre-activations: one grouped GEMM gives the hidden gradient, the recomputed
hidden and the routing-weight gradient together; grouped ``A^T B`` kernels give the weight gradients;
the input gradient is a grouped GEMM plus the same combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixcompile import ExpertTensors
from mixcompile_plugins.triton import cdiv, next_power_of_2
from mixcompile_plugins.triton.grouped import Groups, matmul, up, up_backward, weight_grad
from mixcompile_plugins.triton.sorting import ByExpert, sort_by_expert, unpacked


def unpack(packed: torch.Tensor, weight: torch.Tensor, num_tokens: int, num_experts: int) -> ByExpert:
    """The sorted pairs a training forward saved (:attr:`ByExpert.packed`), with the routing weights of the
    plan's pairs, for backward (which then does not sort again)."""
    order = unpacked(packed, weight.numel(), num_tokens, num_experts)[0]
    return ByExpert.of(packed, weight[order].float(), num_tokens, num_experts)


def route(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    pairs_per_token: int = 0,
) -> ByExpert:
    """Sort the pairs by expert (stable, so the order is reproducible in backward) and list each token's.

    ``pairs_per_token > 0`` declares that token ``t``'s pairs are the plan's ``t*k`` to ``t*k + k - 1``
    (:attr:`mixcompile.RoutingPlan.pairs_per_token`): the by-token lists then come with the sort; other
    plans' are counted (:mod:`~mixcompile_plugins.triton.sorting`)."""
    if pairs_per_token and token_index.numel() != num_tokens * pairs_per_token:
        raise ValueError(
            f"a RoutingPlan with pairs_per_token={pairs_per_token} and {num_tokens} tokens must list "
            f"{num_tokens * pairs_per_token} pairs, got {token_index.numel()} (pairs_per_token=None if some "
            "were dropped)."
        )
    # The sort reads the pairs at unit stride: a router's plan may hold column views of [N, k] tensors.
    pairs = (token_index.contiguous(), expert_index.contiguous(), weight.contiguous())
    return sort_by_expert(*pairs, num_tokens, num_experts, pairs_per_token)


def _groups(pairs: ByExpert) -> Groups:
    """The sorted pairs as the grouped GEMMs' rows: expert runs, each pair gathering its token's row."""
    return Groups(pairs.offsets, pairs.rows, pairs.order.numel())


@triton.jit
def _combine_kernel(
    src_ptr, weight_ptr, by_token_ptr, token_offsets_ptr, out_ptr, D,
    WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[t] = the (weighted) sum of token t's pair rows, in list order; zeros for a token without pairs."""
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    start = tl.load(token_offsets_ptr + t)
    end = tl.load(token_offsets_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for j in range(start, end):
        s = tl.load(by_token_ptr + j).to(tl.int64)
        row = tl.load(src_ptr + s * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            row = row * tl.load(weight_ptr + s)
        acc += row
    tl.store(out_ptr + t.to(tl.int64) * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def combine(src: torch.Tensor, pairs: ByExpert, num_tokens: int, *, weighted: bool) -> torch.Tensor:
    """``[P, d]`` rows in sorted order → ``[N, d]``: each token's (weighted) sum over its pairs."""
    d = src.shape[1]
    out = src.new_empty(num_tokens, d)
    block_d = min(next_power_of_2(d), 1024)
    _combine_kernel[(num_tokens, cdiv(d, block_d))](
        src, pairs.weight, pairs.by_token, pairs.token_offsets, out, d,
        WEIGHTED=weighted, BLOCK_D=block_d,
    )  # fmt: skip
    return out


@triton.jit
def _scaled_rows_kernel(src_ptr, rows_ptr, scale_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[p] = src[rows[p]] * scale[p], multiplied in fp32 and rounded once."""
    p = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    r = tl.load(rows_ptr + p).to(tl.int64)
    row = tl.load(src_ptr + r * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    row = row * tl.load(scale_ptr + p)
    tl.store(out_ptr + p.to(tl.int64) * D + offs_d, row.to(out_ptr.dtype.element_ty), mask=d_mask)


def scaled_rows(src: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``src[rows] * scale[:, None]`` in ``src``'s dtype, the product in fp32 rounded once: the gather and
    the scaling in one pass. PyTorch's multiply of a bf16 tensor by fp32 weights takes its unvectorised
    mixed-dtype path: 0.58 ms of the E64 top-8 training step on an H200 (16K tokens), after a gather."""
    src = src.contiguous()
    p, d = rows.numel(), src.shape[1]
    out = src.new_empty(p, d)
    if p and d:
        block_d = min(next_power_of_2(d), 1024)
        _scaled_rows_kernel[(p, cdiv(d, block_d))](src, rows, scale, out, d, BLOCK_D=block_d)
    return out


def moe_forward(
    x: torch.Tensor, pairs: ByExpert, experts: ExpertTensors, activation: str, save: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(y [N, d], pre, pre_gate)``; the pre-activations ``[P, h]`` (sorted order) only when ``save``."""
    groups = _groups(pairs)
    hidden, pre, pre_gate = up(x, groups, experts, activation, save)
    out = matmul(hidden, groups, experts.w_out, experts.b_out, transposed=True)
    return combine(out, pairs, x.shape[0], weighted=True), pre, pre_gate


@dataclass(frozen=True)
class MoEGrads:
    """Gradients of the MoE inputs; None for the expert tensors a block does not have."""

    x: torch.Tensor
    weight: torch.Tensor
    experts: ExpertTensors


def moe_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    pairs: ByExpert,
    weight_dtype: torch.dtype,
    experts: ExpertTensors,
    pre: torch.Tensor,
    pre_gate: torch.Tensor | None,
    activation: str,
    into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MoEGrads:
    """Every gradient of :func:`moe_forward` from ``dy [N, d]`` and the saved pre-activations (the input
    biases are not needed). ``into``: where to write the up and gate weights' gradients (``(dw_in,
    dw_gate)``, e.g. the two halves of one fused gate-up gradient) instead of new tensors."""
    w_in, w_gate, w_out, b_out = experts.w_in, experts.w_gate, experts.w_out, experts.b_out
    groups = _groups(pairs)
    hidden, d_pre, d_pre_gate, dweight_sorted = up_backward(
        dy, groups, w_out, pre, pre_gate, activation, pairs.weight
    )
    assert groups.rows is not None and dweight_sorted is not None  # MoE pairs gather rows; scaled by weight
    if b_out is not None:  # <dy[t], b_out[e]>: the bias part of <dy[t], expert_e(x[t])>
        dweight_sorted = dweight_sorted + (dy.float() @ b_out.float().t())[pairs.rows, pairs.expert]
    dweight = torch.empty_like(dweight_sorted)
    dweight[pairs.order] = dweight_sorted
    wdt, has_bias = w_in.dtype, b_out is not None
    # The weight gradients read rows in sorted order (so their loops pipeline): one gathered copy at a time.
    dy_sorted = scaled_rows(dy, groups.rows, pairs.weight)
    dw_out, db_out = weight_grad(dy_sorted, hidden, groups, bias=has_bias, dtype=wdt)
    del dy_sorted, hidden  # [P, h]: not alive with the other weight gradients (Mixtral at 16K: 0.9 GiB)
    x_sorted = torch.index_select(x, 0, groups.rows)
    dw_in_out, dw_gate_out = (None, None) if into is None else into
    dw_in, db_in = weight_grad(d_pre, x_sorted, groups, bias=has_bias, dtype=wdt, out=dw_in_out)
    dw_gate = db_gate = None
    second = None
    if pre_gate is not None:
        assert d_pre_gate is not None and w_gate is not None  # a gated block's
        dw_gate, db_gate = weight_grad(
            d_pre_gate, x_sorted, groups, bias=has_bias, dtype=wdt, out=dw_gate_out
        )
        second = (d_pre_gate, w_gate)
    del x_sorted
    dx_pairs = matmul(d_pre, groups, w_in, None, transposed=False, second=second)
    dx = combine(dx_pairs, pairs, x.shape[0], weighted=False)
    grads = ExpertTensors(dw_in, dw_gate, dw_out, db_in, db_gate, db_out)
    return MoEGrads(dx, dweight.to(weight_dtype), grads)
