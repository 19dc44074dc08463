"""The MoT forward and backward passes: mix, expert GEMMs (the grouped kernels), unmix.

Mixing is a reduction over the G members of a group, batched over groups; the expert GEMMs are batched over
experts. Folding the mix into the up-projection's prologue would redo it on CUDA cores once per column
tile (about ``15·G/BLOCK_N`` times the tensor-core time of the GEMM itself), so the mixed tokens are written
once, in the input dtype, by a kernel that reads each group once and mixes it for all experts with one small
``tl.dot``; unmixing is the mirror image. The gradients of the merge / emit weights (``<x, d_mixed>`` and
``<dy, out>``) come out of those same passes, so no ``[.., E, d]`` tensor is read twice.

Rows of the ``[T, n, G, d]`` tensors are addressed through their strides (the block hands over a permuted
view), and the output keeps the input's memory layout so the block's permute back is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from mixcompile import ExpertTensors
from mixcompile_plugins.triton import next_power_of_2
from mixcompile_plugins.triton.grouped import Groups, dot_precision, matmul, mma, up, up_backward, weight_grad
from mixcompile_plugins.triton.tuning import MAX_LIVE_VALUES


@triton.jit
def _expert_rows(es, r, R, D):
    """Offsets of row ``r`` of each expert ``es`` in an ``[E, R, D]`` tensor, in int64: ``E·R·D`` passes 2^31
    at real sizes (E=64, d=4096, 16k tokens with G=2)."""
    return (es.to(tl.int64) * R + r) * D


@triton.jit
def _members(base, gs, s_g):
    """Offsets of group members ``gs`` through the member stride, in int64 (a strided view's stride can be
    the whole batch)."""
    return base + gs.to(tl.int64) * s_g


@triton.jit
def _mix_kernel(
    src_ptr, w_ptr, dst_ptr, other_ptr, dw_ptr,
    R, NG, G, E, D, s_t, s_n, s_g, s_d,
    HAS_DW: tl.constexpr, PRECISION: tl.constexpr,
    G_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst[e, r] = sum_g w[r, g, e] src[r, g]; with HAS_DW also dw[r, g, e] = <src[r, g], other[e, r]>.

    ``src`` is ``[T, NG, G, D]`` through its strides (r = t * NG + n); ``w`` ``[R, G, E]`` and ``dst`` /
    ``other`` ``[E, R, D]`` are contiguous.
    """
    r = tl.program_id(0).to(tl.int64)
    src_base = (r // NG) * s_t + (r % NG) * s_n
    gs = tl.arange(0, G_POW2)
    es = tl.arange(0, E_POW2)
    ge_mask = (gs < G)[:, None] & (es < E)[None, :]
    ge_off = r * G * E + gs[:, None] * E + es[None, :]
    w = tl.load(w_ptr + ge_off, mask=ge_mask, other=0.0)
    dw = tl.zeros((G_POW2, E_POW2), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        s = tl.load(
            src_ptr + _members(src_base, gs, s_g)[:, None] + ds[None, :] * s_d,
            mask=(gs < G)[:, None] & d_mask[None, :],
            other=0.0,
        )
        mixed = mma(tl.trans(w.to(s.dtype)), s, tl.zeros((E_POW2, BLOCK_D), tl.float32), PRECISION)
        ed_off = _expert_rows(es, r, R, D)[:, None] + ds[None, :]
        ed_mask = (es < E)[:, None] & d_mask[None, :]
        tl.store(dst_ptr + ed_off, mixed.to(dst_ptr.dtype.element_ty), mask=ed_mask)
        if HAS_DW:
            o = tl.load(other_ptr + ed_off, mask=ed_mask, other=0.0)
            dw = mma(s, tl.trans(o), dw, PRECISION)
    if HAS_DW:
        tl.store(dw_ptr + ge_off, dw.to(dw_ptr.dtype.element_ty), mask=ge_mask)


@triton.jit
def _unmix_kernel(
    v_ptr, w_ptr, y_ptr, other_ptr, dw_ptr,
    R, NG, G, E, D, y_t, y_n, y_g, y_d, o_t, o_n, o_g, o_d,
    HAS_DW: tl.constexpr, PRECISION: tl.constexpr,
    G_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """y[r, g] = sum_e w[r, g, e] v[e, r]; with HAS_DW also dw[r, g, e] = <other[r, g], v[e, r]>.

    ``v`` ``[E, R, D]`` and ``w`` ``[R, G, E]`` are contiguous; ``y`` and ``other`` are ``[T, NG, G, D]``
    through their strides.
    """
    r = tl.program_id(0).to(tl.int64)
    y_base = (r // NG) * y_t + (r % NG) * y_n
    o_base = (r // NG) * o_t + (r % NG) * o_n
    gs = tl.arange(0, G_POW2)
    es = tl.arange(0, E_POW2)
    ge_mask = (gs < G)[:, None] & (es < E)[None, :]
    ge_off = r * G * E + gs[:, None] * E + es[None, :]
    w = tl.load(w_ptr + ge_off, mask=ge_mask, other=0.0)
    dw = tl.zeros((G_POW2, E_POW2), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        gd_mask = (gs < G)[:, None] & d_mask[None, :]
        v_off = _expert_rows(es, r, R, D)[:, None] + ds[None, :]
        v = tl.load(v_ptr + v_off, mask=(es < E)[:, None] & d_mask[None, :], other=0.0)
        y = mma(w.to(v.dtype), v, tl.zeros((G_POW2, BLOCK_D), tl.float32), PRECISION)
        y_off = _members(y_base, gs, y_g)[:, None] + ds[None, :] * y_d
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=gd_mask)
        if HAS_DW:
            o_off = _members(o_base, gs, o_g)[:, None] + ds[None, :] * o_d
            o = tl.load(other_ptr + o_off, mask=gd_mask, other=0.0)
            dw = mma(o, tl.trans(v), dw, PRECISION)
    if HAS_DW:
        tl.store(dw_ptr + ge_off, dw.to(dw_ptr.dtype.element_ty), mask=ge_mask)


def _tile_sizes(g: int, e: int, d: int, has_dw: bool, precision: str) -> tuple[int, int, int, int, int]:
    """Padded G and E (``tl.dot`` needs 16+), the widest d tile (16 to 128: it is the K of the weight
    gradient's dot, so a smaller d is padded too, the masks zeroing the padding) and then the fewest warps
    that keep the live tiles (weights ``[G, E]``, the group ``[G, d]``, the mixes ``[E, d]``; the weight
    gradient and the other operand with ``has_dw``; twice as many for three-product fp32 dots) within
    ``MAX_LIVE_VALUES`` per thread, as far as 8 warps and a d tile of 16 allow (G=32 with E=256); and the
    pipeline's stages: two for three-product fp32 dots over 256 experts, whose split operands also take
    shared memory (at three, G=32 with the weight gradient needed 106,496 bytes, over sm_86/89's 101,376)."""
    g_pow2 = max(16, next_power_of_2(g))
    e_pow2 = max(16, next_power_of_2(e))

    def live(block_d: int, warps: int) -> int:
        values = (1 + has_dw) * (g_pow2 * e_pow2 + e_pow2 * block_d) + g_pow2 * block_d
        return (1 + (precision == "tf32x3")) * values // (32 * warps)

    for warps in (4, 8):  # 16 warps cap a thread at 128 registers: they spilled where 8 did not
        block_d = max(16, min(next_power_of_2(d), 128))
        while block_d > 16 and live(block_d, warps) > MAX_LIVE_VALUES:
            block_d //= 2
        if live(block_d, warps) <= MAX_LIVE_VALUES:
            break
    return g_pow2, e_pow2, block_d, warps, 2 if precision == "tf32x3" and e_pow2 >= 256 else 3


def mix(
    src: torch.Tensor, w: torch.Tensor, other: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``src [T, n, G, d]``, ``w [T, n, G, E]`` → ``[E·T·n, d]`` per-expert mixes (and ``<src, other>``)."""
    t, n, g, d = src.shape
    e = w.shape[-1]
    r = t * n
    dst = src.new_empty(e * r, d)
    dw = torch.empty_like(w) if other is not None else None
    if r == 0:  # an empty batch or sequence
        return dst, dw
    precision = dot_precision(src.dtype)
    g_pow2, e_pow2, block_d, warps, stages = _tile_sizes(g, e, d, other is not None, precision)
    _mix_kernel[(r,)](
        src, w, dst, dst if other is None else other, w if dw is None else dw,
        r, n, g, e, d, *src.stride(),
        HAS_DW=other is not None, PRECISION=precision,
        G_POW2=g_pow2, E_POW2=e_pow2, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dst, dw


def unmix(
    v: torch.Tensor, w: torch.Tensor, like: torch.Tensor, other: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``v [E·T·n, d]``, ``w [T, n, G, E]`` → ``[T, n, G, d]`` laid out like ``like`` (and ``<other, v>``)."""
    t, n, g, d = like.shape
    e = w.shape[-1]
    y = torch.empty_like(like)
    dw = torch.empty_like(w) if other is not None else None
    o = y if other is None else other
    if t * n == 0:
        return y, dw
    precision = dot_precision(v.dtype)
    g_pow2, e_pow2, block_d, warps, stages = _tile_sizes(g, e, d, other is not None, precision)
    _unmix_kernel[(t * n,)](
        v, w, y, o, w if dw is None else dw,
        t * n, n, g, e, d, *y.stride(), *o.stride(),
        HAS_DW=other is not None, PRECISION=precision,
        G_POW2=g_pow2, E_POW2=e_pow2, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y, dw


def expert_groups(num_experts: int, rows: int, device: torch.device) -> Groups:
    """Every expert owns ``rows`` consecutive rows (the MoT layout ``[E, T·n, d]``)."""
    offsets = torch.arange(num_experts + 1, device=device, dtype=torch.int32) * rows
    return Groups(offsets, None, num_experts * rows)


def mot_forward(
    x_g: torch.Tensor,
    merge: torch.Tensor,
    emit: torch.Tensor,
    experts: ExpertTensors,
    activation: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(y, pre, pre_gate, out)``: the output and, when ``save``, what backward needs. Each intermediate is
    dropped once read: at most two of the ``[E·T·n, ...]`` ones are alive at once."""
    t, n = x_g.shape[:2]
    groups = expert_groups(experts.w_in.shape[0], t * n, x_g.device)
    mixed, _ = mix(x_g, merge)
    hidden, pre, pre_gate = up(mixed, groups, experts, activation, save)
    del mixed
    out = matmul(hidden, groups, experts.w_out, experts.b_out, transposed=True)
    del hidden
    y, _ = unmix(out, emit, x_g)
    return y, pre, pre_gate, out if save else None


@dataclass(frozen=True)
class MoTGrads:
    """Gradients of :func:`mot_forward`'s inputs; None for the expert tensors a block does not have."""

    x_g: torch.Tensor
    merge: torch.Tensor
    emit: torch.Tensor
    experts: ExpertTensors


def mot_backward(
    dy: torch.Tensor,
    x_g: torch.Tensor,
    merge: torch.Tensor,
    emit: torch.Tensor,
    experts: ExpertTensors,
    pre: torch.Tensor,
    pre_gate: torch.Tensor | None,
    out: torch.Tensor,
    activation: str,
    has_bias: bool,
) -> MoTGrads:
    """Every gradient of :func:`mot_forward`; the mixed tokens and the hidden layer are recomputed (the
    biases are not needed: ``has_bias`` says whether to return theirs).

    Each ``[E·T·n, d]`` or ``[E·T·n, h]`` intermediate is dropped after the last kernel that reads it, so at
    most two of the ``[E·T·n, d]`` ones (the size of every expert's mixed tokens) are alive at once."""
    w_in, w_gate, w_out = experts.w_in, experts.w_gate, experts.w_out
    t, n = x_g.shape[:2]
    groups = expert_groups(w_in.shape[0], t * n, x_g.device)
    wdt = w_in.dtype
    d_out, d_emit = mix(dy, emit, other=out)
    assert d_emit is not None  # given other=
    hidden, d_pre, d_pre_gate, _ = up_backward(d_out, groups, w_out, pre, pre_gate, activation, None)
    sorted_rows: dict[str, Any] = {"bias": has_bias, "dtype": wdt}
    dw_out, db_out = weight_grad(d_out, hidden, groups, **sorted_rows)
    del d_out, hidden
    mixed, _ = mix(x_g, merge)
    dw_in, db_in = weight_grad(d_pre, mixed, groups, **sorted_rows)
    dw_gate = db_gate = None
    second = None
    if pre_gate is not None:
        assert d_pre_gate is not None and w_gate is not None  # a gated block's
        dw_gate, db_gate = weight_grad(d_pre_gate, mixed, groups, **sorted_rows)
        second = (d_pre_gate, w_gate)
    del mixed
    d_mixed = matmul(d_pre, groups, w_in, None, transposed=False, second=second)
    del d_pre, d_pre_gate, second
    dx, d_merge = unmix(d_mixed, merge, x_g, other=x_g)
    assert d_merge is not None  # given other=
    return MoTGrads(dx, d_merge, d_emit, ExpertTensors(dw_in, dw_gate, dw_out, db_in, db_gate, db_out))
