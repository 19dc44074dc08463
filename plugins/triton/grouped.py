"""Grouped GEMMs over rows sorted by expert: the building blocks of the MoE and MoT kernels.

Expert ``e`` owns the sorted rows ``offsets[e]:offsets[e+1]``; ``rows[s]`` names the source row of sorted row
``s`` in the left operand, so the gather happens in the load and the forward writes no permuted copy of the
activations (the weight gradients, whose loops run over rows, take sorted copies: see ``_wgrad_kernel``).
Each program finds its expert from ``offsets`` itself (a prefix sum over E), so the row block size
stays autotunable and the grid needs no host sync: it has room for ``cdiv(P, BLOCK_M) + E`` row blocks and
the unused programs return at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixcompile import ExpertTensors
from mixcompile_plugins.triton import cdiv, interpreting, next_power_of_2
from mixcompile_plugins.triton.activations import CODES, activate, derivative
from mixcompile_plugins.triton.tuning import autotune


def _configs(interpreted: dict[str, int], shapes: Sequence[tuple[int, ...]]) -> list[triton.Config]:
    """Tile shapes to autotune over, in order of preference; one in the interpreter, which would time each."""
    if interpreting():
        return [triton.Config(interpreted, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Triton 3.9's interpreter multiplies bfloat16 bit patterns as integers in ``tl.dot``; it gets fp32 operands.
_UPCAST_DOT = tl.constexpr(interpreting())
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the pruner keeps what fits the GPU and the kernel's variant.
# 128 x 256 fits only the kernels whose one accumulator is all they hold, on sm_90 and later
# (tuning.MAX_ACCUMULATOR_VALUES): not the up projection's backward, whose epilogue loads more tiles.
_SHAPES = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (128, 64, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 64, 8, 4),
    (32, 64, 32, 4, 2),
    (32, 64, 32, 8, 2),
]
_MM_CONFIGS = _configs({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, _SHAPES)
_WGRAD_CONFIGS = _configs({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, _SHAPES)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _MM_CONFIGS)
# What every grouped GEMM's tuning depends on, besides its own flags: the sizes, the weight's strides (which
# dimension is contiguous), the rows per expert, the dot's precision and the experts' power of two.
_GROUPED_KEYS = ["N", "K", "SW_N", "SW_K", "ROWS_HINT", "PRECISION", "E_POW2"]


def _staged(config: triton.Config, a_tiles: int, b_tiles: int, args: dict, operand: str) -> int:
    """Shared memory of a pipelined main loop: ``num_stages`` copies of its ``[M, K]``, ``[K, N]`` tiles of
    ``args[operand]``'s dtype, and for three-product fp32 dots one more stage (their split operands)."""
    m, n, k = (config.kwargs[f"BLOCK_{x}"] for x in "MNK")
    stages = config.num_stages + (args["PRECISION"] == "tf32x3")
    return stages * (a_tiles * m * k + b_tiles * k * n) * args[operand].element_size()


def _live(config: triton.Config, tiles: int, precision: str) -> int:
    """fp32 values per thread in ``tiles`` ``[M, N]`` tiles; twice that for three-product fp32 dots, whose
    split operands take about as many registers as the accumulators (measured on sm_90)."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return (1 + (precision == "tf32x3")) * tiles * m * n // (32 * config.num_warps)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch would (``torch.set_float32_matmul_precision``); at "highest"
    they use three TF32 products (hi·hi + hi·lo + lo·hi), about fp32's accuracy on tensor cores, where IEEE
    dots would be FMA loops on CUDA cores (slow, and too many live registers to avoid spills)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


@dataclass(frozen=True)
class Groups:
    """Rows sorted by expert: ``offsets [E+1]`` int32 and ``rows [P]`` int32 source rows (None: identity)."""

    offsets: torch.Tensor
    rows: torch.Tensor | None
    num_rows: int

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def rows_hint(self) -> int:
        """A coarse rows-per-expert for the autotuning key (exact counts change every step)."""
        return next_power_of_2(max(1, self.num_rows // self.num_experts))

    def grid(self, columns: int) -> Callable[[dict], tuple[int]]:
        """Row blocks (with room for one partial block per expert) times column tiles, as one axis."""
        e = self.num_experts
        return lambda meta: ((cdiv(self.num_rows, meta["BLOCK_M"]) + e) * cdiv(columns, meta["BLOCK_N"]),)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``, fp32 accumulation."""
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _find_block(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of row block ``pid_m``; expert >= E past the last block."""
    ids = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + ids, mask=ids < E, other=0)
    hi = tl.load(offsets_ptr + ids + 1, mask=ids < E, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
    mine = ids == expert
    first_block = tl.sum(tl.where(mine, ends - blocks, 0), 0)
    start = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_block) * BLOCK_M
    end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, start, end


# Row blocks per group of the program order (see _tile).
_GROUP_M = tl.constexpr(8)


@triton.jit
def _tile(offsets_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr):
    """This program's (expert, first row, end row, column tile).

    Programs run in groups of ``_GROUP_M`` row blocks, row blocks varying fastest within a group, so the
    programs running together share a few blocks of (gathered) rows and a narrow band of one expert's
    weight columns, and both stay in L2. Walking every column tile of one row block before the next streams
    a wide weight from memory about once per row block: Mixtral's gate and up projections (235 MB per
    expert) 32 times per expert at 16K tokens, up to 60 GB in one forward, longer than its arithmetic.
    """
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    pid = tl.program_id(0)
    per_group = _GROUP_M * num_n
    first_m = (pid // per_group) * _GROUP_M
    group_rows = tl.minimum(num_m - first_m, _GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    expert, start, end = _find_block(pid_m, offsets_ptr, E, BLOCK_M, E_POW2)
    return expert, start, end, (pid % per_group) // group_rows


@triton.jit
def _tile_offsets(N, offs_n, BLOCK_M: tl.constexpr):
    """int32 offsets of a row block's ``[BLOCK_M, BLOCK_N]`` tile in a row-major ``[.., N]`` tensor, from its
    first row (the caller adds the block's row offset once, in int64)."""
    return tl.arange(0, BLOCK_M)[:, None] * N + offs_n[None, :]


@triton.jit
def _partial_offsets(pid_n, P, offs_m):
    """Where column tile ``pid_n`` writes row partial sums in ``[tiles, P]``: int64, as ``tiles·P`` passes
    2^31 at about 9.6M routed pairs with h=7168 (224 tiles of 32 columns)."""
    return pid_n.to(tl.int64) * P + offs_m


@triton.jit
def _source_rows(rows_ptr, offs_m, m_mask, GATHER: tl.constexpr):
    src = tl.load(rows_ptr + offs_m, mask=m_mask, other=0) if GATHER else offs_m
    return src.to(tl.int64)


def _up_smem(config: triton.Config, args: dict) -> int:
    return _staged(config, 1, 1, args, "a_ptr")


def _up_live(config: triton.Config, args: dict) -> int:
    """One accumulator: a gated tile holds the gate's and the up projection's columns side by side."""
    return _live(config, 1, args["PRECISION"])


@autotune(
    _MM_CONFIGS,
    [*_GROUPED_KEYS, "GATHER", "GATED", "HAS_BIAS", "SAVE_PRE", "ACT"],
    _up_smem,
    _up_live,
    lone_accumulator=True,
    tiles_expert_rows=True,
)
@triton.jit
def _up_kernel(
    a_ptr, rows_ptr, offsets_ptr, w_ptr, wg_ptr, b_ptr, bg_ptr, hidden_ptr, pre_ptr, pre_g_ptr,
    E, N, K, SW_E, SW_N, SW_K, ROWS_HINT,
    GATHER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """hidden = act(A W^T + b), or act(A Wg^T + bg) * (A W^T + b); weights [E, N, K] (strides ``SW_*``,
    shared by W and Wg), A rows gathered.

    A gated tile is ``BLOCK_N / 2`` columns of Wg beside the same columns of W: one dot per step and one
    accumulator, as in the plain GEMM (two dots into two accumulators spilled at 128 x 128 each on sm_90).
    The epilogue runs on quarters of the tile, so that its loads, activation and stores add little to the
    accumulator's registers (at 128 x 256 the whole-tile epilogue spilled in 24 of 49 bf16 variants).
    """
    expert, start, end, pid_n = _tile(offsets_ptr, E, N * (1 + GATED), BLOCK_M, BLOCK_N, E_POW2)
    if expert >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    src = _source_rows(rows_ptr, offs_m, m_mask, GATHER)
    cols = tl.arange(0, BLOCK_N)
    offs_c = pid_n * (BLOCK_N // 2) + cols % (BLOCK_N // 2) if GATED else pid_n * BLOCK_N + cols
    c_mask = offs_c < N
    w_base = expert.to(tl.int64) * SW_E
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + src[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        w_off = w_base + offs_c[None, :] * SW_N + offs_k[:, None] * SW_K
        if GATED:
            w_ptrs = tl.where((cols < BLOCK_N // 2)[None, :], wg_ptr + w_off, w_ptr + w_off)
        else:
            w_ptrs = w_ptr + w_off
        w = tl.load(w_ptrs, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION)
    first, second = _halves(acc, BLOCK_M, BLOCK_N)
    q0, q1 = _halves(first, BLOCK_M, BLOCK_N // 2)
    q2, q3 = _halves(second, BLOCK_M, BLOCK_N // 2)
    offs_n = pid_n * (BLOCK_N // (1 + GATED)) + tl.arange(0, BLOCK_N // 4)
    if GATED:  # q0, q1: columns of the gate; q2, q3: the same columns of the up projection
        _up_store(q2, q0, offs_n, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip
        _up_store(q3, q1, offs_n + BLOCK_N // 4, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip
    else:
        _up_store(q0, q0, offs_n, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip
        _up_store(q1, q1, offs_n + BLOCK_N // 4, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip
        _up_store(q2, q2, offs_n + BLOCK_N // 2, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip
        _up_store(q3, q3, offs_n + 3 * (BLOCK_N // 4), offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr,
                  pre_ptr, pre_g_ptr, GATED, HAS_BIAS, SAVE_PRE, ACT)  # fmt: skip


@triton.jit
def _halves(x, M: tl.constexpr, N: tl.constexpr):
    """The left and right column halves of an ``[M, N]`` tile."""
    return tl.split(tl.permute(tl.reshape(x, (M, 2, N // 2)), (0, 2, 1)))


@triton.jit
def _up_store(
    up, gate, offs_n, offs_m, m_mask, N, expert, b_ptr, bg_ptr, hidden_ptr, pre_ptr, pre_g_ptr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, ACT: tl.constexpr,
):  # fmt: skip
    """The up kernel's epilogue for columns ``offs_n``: bias, activation (times the up projection if gated),
    stores (``gate`` is unused unless ``GATED``)."""
    n_mask = offs_n < N
    if HAS_BIAS:
        up += tl.load(b_ptr + expert * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            gate += tl.load(bg_ptr + expert * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    hidden = activate(gate, ACT) * up if GATED else activate(up, ACT)
    out = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(hidden_ptr + out, hidden.to(hidden_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PRE:
        tl.store(pre_ptr + out, up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        if GATED:
            tl.store(pre_g_ptr + out, gate.to(pre_g_ptr.dtype.element_ty), mask=out_mask)


def _mm_smem(config: triton.Config, args: dict) -> int:
    """Staged tiles of both products with ``SECOND`` in fp32 (one loop), of one otherwise: with 16-bit
    operands the two products' loops run in turn, and Triton reuses the first one's buffers (sm_90)."""
    pairs = 1 + (args["SECOND"] and args["a_ptr"].dtype == torch.float32)
    return _staged(config, pairs, pairs, args, "a_ptr")


def _one_tile(config: triton.Config, args: dict) -> int:
    return _live(config, 1, args["PRECISION"])


@triton.jit
def _mm_loop(
    a_ptr, w_ptr, a2_ptr, w2_ptr, rows, m_mask, offs_n, n_mask, K, SW_K, SW_N, acc,
    BOTH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc + A[rows] W`` (``+ A2[rows] W2`` with ``BOTH``) over all of ``K``."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_off = rows[:, None] * K + offs_k[None, :]
        a_mask = m_mask[:, None] & k_mask[None, :]
        w_off = offs_k[:, None] * SW_K + offs_n[None, :] * SW_N
        w_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        acc = mma(a, tl.load(w_ptr + w_off, mask=w_mask, other=0.0), acc, PRECISION)
        if BOTH:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            acc = mma(a2, tl.load(w2_ptr + w_off, mask=w_mask, other=0.0), acc, PRECISION)
    return acc


@autotune(
    _MM_CONFIGS,
    [*_GROUPED_KEYS, "SECOND", "HAS_BIAS"],
    _mm_smem,
    _one_tile,
    lone_accumulator=True,
    tiles_expert_rows=True,
)
@triton.jit
def _mm_kernel(
    a_ptr, a2_ptr, offsets_ptr, w_ptr, w2_ptr, b_ptr, c_ptr,
    E, N, K, SW_E, SW_N, SW_K, ROWS_HINT,
    SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C = A W[e] (+ A2 W2[e]) (+ b[e]) on sorted rows; W[e] is ``[K, N]`` as its strides ``SW_K, SW_N`` say
    (W2 has W's strides)."""
    expert, start, end, pid_n = _tile(offsets_ptr, E, N, BLOCK_M, BLOCK_N, E_POW2)
    if expert >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = expert.to(tl.int64) * SW_E
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    w, w2 = w_ptr + w_base, w2_ptr + w_base
    # Two dots in one loop step keep no wgmma in flight on sm_90 (each step waits for both), so with 16-bit
    # operands each product gets its own loop (one dot per step, one in flight). fp32 operands keep one
    # loop: there two pipelined loops spilled (32-1644 bytes on sm_90 in TF32) and one loop did not.
    split = SECOND and a_ptr.dtype.element_ty != tl.float32
    acc = _mm_loop(a_ptr, w, a2_ptr, w2, rows, m_mask, offs_n, n_mask, K, SW_K, SW_N, acc,
                   SECOND and not split, PRECISION, BLOCK_K)  # fmt: skip
    if split:
        acc = _mm_loop(a2_ptr, w2, a2_ptr, w2, rows, m_mask, offs_n, n_mask, K, SW_K, SW_N, acc,
                       False, PRECISION, BLOCK_K)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = rows[:, None] * N + offs_n[None, :]
    tl.store(c_ptr + out, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# The partial sums of the routing-weight gradient are written per column tile, so a config with wider tiles
# leaves rows of a narrower one untouched: autotuning re-zeroes them after each trial and before the real run.
def _up_backward_smem(config: triton.Config, args: dict) -> int:
    return _staged(config, 1, 1, args, "dy_ptr")


def _up_backward_live(config: triton.Config, args: dict) -> int:
    """The accumulator, its epilogue (loaded pre-activations, activation, derivative) a quarter tile at a
    time: 128 x 128 at 8 warps fits sm_90 in every variant; 128 x 256 spilled 16-416 bytes in 15 of 37."""
    return _live(config, 1, args["PRECISION"])


@autotune(
    _MM_CONFIGS,
    [*_GROUPED_KEYS, "GATHER", "SCALE", "DSCALE", "GATED", "ACT"],
    _up_backward_smem,
    _up_backward_live,
    reset_to_zero=["dscale_ptr"],
    tiles_expert_rows=True,
)
@triton.jit
def _up_backward_kernel(
    dy_ptr, rows_ptr, scale_ptr, offsets_ptr, w_ptr, pre_ptr, pre_g_ptr,
    hidden_ptr, d_pre_ptr, d_pre_g_ptr, dscale_ptr,
    E, N, K, SW_E, SW_N, SW_K, P, ROWS_HINT,
    GATHER: tl.constexpr, SCALE: tl.constexpr, DSCALE: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Back through the down projection and the activation, from the saved pre-activations.

    ``G = dY[rows] W_out[e]`` (W_out [E, K, N], strides ``SW_*``); the epilogue recomputes ``hidden``
    (stored for the weight gradient), writes this column tile's share of ``<G, hidden>`` (the routing-weight
    gradient) to ``dscale[pid_n]``, and stores the pre-activation gradients of ``scale * G``. It runs a
    quarter tile at a time (as the up projection's does), so its loaded tiles add little to the accumulator.
    """
    expert, start, end, pid_n = _tile(offsets_ptr, E, N, BLOCK_M, BLOCK_N, E_POW2)
    if expert >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    src = _source_rows(rows_ptr, offs_m, m_mask, GATHER)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = expert.to(tl.int64) * SW_E
    g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            dy_ptr + src[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + w_base + offs_k[:, None] * SW_K + offs_n[None, :] * SW_N,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        g = mma(a, w, g, PRECISION)
    scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32) if SCALE else 1.0
    first, second = _halves(g, BLOCK_M, BLOCK_N)
    q0, q1 = _halves(first, BLOCK_M, BLOCK_N // 2)
    q2, q3 = _halves(second, BLOCK_M, BLOCK_N // 2)
    offs_q = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 4)
    base = start.to(tl.int64) * N
    dscale = _activation_backward(q0, offs_q, base, offs_m, m_mask, scale, N, pre_ptr, pre_g_ptr,
                                  hidden_ptr, d_pre_ptr, d_pre_g_ptr, SCALE, DSCALE, GATED, ACT,
                                  BLOCK_M)  # fmt: skip
    dscale += _activation_backward(q1, offs_q + BLOCK_N // 4, base, offs_m, m_mask, scale, N, pre_ptr,
                                   pre_g_ptr, hidden_ptr, d_pre_ptr, d_pre_g_ptr, SCALE, DSCALE, GATED, ACT,
                                   BLOCK_M)  # fmt: skip
    dscale += _activation_backward(q2, offs_q + BLOCK_N // 2, base, offs_m, m_mask, scale, N, pre_ptr,
                                   pre_g_ptr, hidden_ptr, d_pre_ptr, d_pre_g_ptr, SCALE, DSCALE, GATED, ACT,
                                   BLOCK_M)  # fmt: skip
    dscale += _activation_backward(q3, offs_q + 3 * (BLOCK_N // 4), base, offs_m, m_mask, scale, N, pre_ptr,
                                   pre_g_ptr, hidden_ptr, d_pre_ptr, d_pre_g_ptr, SCALE, DSCALE, GATED, ACT,
                                   BLOCK_M)  # fmt: skip
    if DSCALE:
        tl.store(dscale_ptr + _partial_offsets(pid_n, P, offs_m), dscale, mask=m_mask)


@triton.jit
def _activation_backward(
    g, offs_n, base, offs_m, m_mask, scale, N, pre_ptr, pre_g_ptr, hidden_ptr, d_pre_ptr, d_pre_g_ptr,
    SCALE: tl.constexpr, DSCALE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The up projection's backward epilogue for columns ``offs_n`` of ``G``: stores ``hidden`` and the
    pre-activation gradients of ``scale * G``; returns the rows' share of ``<G, hidden>`` (zeros unless
    ``DSCALE``). Tile offsets are int32 from the block's first row, whose offset ``base`` is int64."""
    out = base + _tile_offsets(N, offs_n, BLOCK_M)
    out_mask = m_mask[:, None] & (offs_n < N)[None, :]
    up = tl.load(pre_ptr + out, mask=out_mask, other=0.0).to(tl.float32)
    if GATED:
        gate = tl.load(pre_g_ptr + out, mask=out_mask, other=0.0).to(tl.float32)
        act_gate = activate(gate, ACT)
        hidden = act_gate * up
    else:
        hidden = activate(up, ACT)
    tl.store(hidden_ptr + out, hidden.to(hidden_ptr.dtype.element_ty), mask=out_mask)
    d_hidden = g * scale[:, None] if SCALE else g
    if GATED:
        tl.store(d_pre_ptr + out, (d_hidden * act_gate).to(d_pre_ptr.dtype.element_ty), mask=out_mask)
        d_gate = d_hidden * up * derivative(gate, ACT)
        tl.store(d_pre_g_ptr + out, d_gate.to(d_pre_g_ptr.dtype.element_ty), mask=out_mask)
    else:
        d_pre = d_hidden * derivative(up, ACT)
        tl.store(d_pre_ptr + out, d_pre.to(d_pre_ptr.dtype.element_ty), mask=out_mask)
    if DSCALE:
        return tl.sum(g * hidden, 1)
    return tl.zeros((BLOCK_M,), tl.float32)


def _wgrad_smem(config: triton.Config, args: dict) -> int:
    return _staged(config, 1, 1, args, "a_ptr")


@autotune(
    _WGRAD_CONFIGS,
    ["M", "N", "SD_N", "ROWS_HINT", "HAS_BIAS", "PRECISION"],
    _wgrad_smem,
    _one_tile,
    lone_accumulator=True,
)
@triton.jit
def _wgrad_kernel(
    a_ptr, b_ptr, offsets_ptr, dw_ptr, db_ptr,
    M, N, SD_E, SD_M, SD_N, ROWS_HINT,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dW[e] = sum over e's sorted rows s of A[s]^T B[s] ([E, M, N], strides ``SD_*``); db[e] = sum of A[s].

    One program owns one output tile of one expert and walks that expert's rows in order: no atomics, and
    an expert without rows writes zeros. Both operands are in sorted order: a row gathered inside this loop
    (an index loaded per step) keeps Triton from pipelining it (seen in the sm_90 compiles: one buffer
    instead of ``num_stages``), so callers gather once beforehand.
    """
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    col = tl.zeros((BLOCK_M,), tl.float32)
    for s0 in range(start, end, BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        s_mask = offs_s < end
        rows = offs_s.to(tl.int64)
        a = tl.load(
            a_ptr + rows[None, :] * M + offs_m[:, None], mask=s_mask[None, :] & m_mask[:, None], other=0.0
        )
        b = tl.load(
            b_ptr + rows[:, None] * N + offs_n[None, :], mask=s_mask[:, None] & n_mask[None, :], other=0.0
        )
        acc = mma(a, b, acc, PRECISION)
        if HAS_BIAS:
            col += tl.sum(a.to(tl.float32), 1)
    out = expert.to(tl.int64) * SD_E + offs_m[:, None].to(tl.int64) * SD_M
    out += offs_n[None, :].to(tl.int64) * SD_N
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:  # noqa: SIM102 (a compile-time test, then a runtime one)
        if pid_n == 0:
            tl.store(db_ptr + expert * M + offs_m, col.to(db_ptr.dtype.element_ty), mask=m_mask)


def _check_shared_strides(w: torch.Tensor, second: torch.Tensor | None) -> None:
    """Two weights read with one set of strides (the halves of a fused gate-up tensor, or two stacks)."""
    if second is not None and second.stride() != w.stride():
        raise ValueError(f"paired expert weights need equal strides, got {w.stride()} and {second.stride()}")


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an operand the kernel's flags compile away."""
    return fallback if t is None else t


def up(
    a: torch.Tensor, groups: Groups, experts: ExpertTensors, activation: str, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(hidden, pre, pre_gate)`` ``[P, h]`` for rows ``a[groups.rows]`` through the experts' up projections
    (and gates); pre-activations only if saved."""
    w, w_gate, b, b_gate = experts.w_in, experts.w_gate, experts.b_in, experts.b_gate
    e, n, k = w.shape
    _check_shared_strides(w, w_gate)
    p = groups.num_rows
    hidden = a.new_empty(p, n)
    pre = a.new_empty(p, n) if save_pre else None
    pre_g = a.new_empty(p, n) if save_pre and w_gate is not None else None
    # A gated tile covers BLOCK_N / 2 columns of each weight: the grid's columns count both.
    _up_kernel[groups.grid(n * (1 + (w_gate is not None)))](
        a, _or(groups.rows, groups.offsets), groups.offsets, w, _or(w_gate, w), _or(b, w), _or(b_gate, w),
        hidden, _or(pre, hidden), _or(pre_g, hidden),
        e, n, k, *w.stride(), groups.rows_hint,
        GATHER=groups.rows is not None, GATED=w_gate is not None, HAS_BIAS=b is not None, SAVE_PRE=save_pre,
        ACT=CODES[activation], PRECISION=dot_precision(a.dtype), E_POW2=next_power_of_2(e),
    )  # fmt: skip
    return hidden, pre, pre_g


def matmul(
    a: torch.Tensor,
    groups: Groups,
    w: torch.Tensor,
    b: torch.Tensor | None,
    *,
    transposed: bool,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``a[s] @ W[e]`` (+ ``a2[s] @ W2[e]``) (+ ``b[e]``) on sorted rows.

    ``W`` is ``[E, N, K]`` used as its transpose (``transposed``, like ``nn.Linear``) or ``[E, K, N]``; any
    strides (``W2`` the same as ``W``).
    """
    e = w.shape[0]
    n, k = (w.shape[1], w.shape[2]) if transposed else (w.shape[2], w.shape[1])
    sw_n, sw_k = (w.stride(1), w.stride(2)) if transposed else (w.stride(2), w.stride(1))
    c = a.new_empty(groups.num_rows, n)
    a2, w2 = second if second is not None else (a, w)
    _check_shared_strides(w, w2)
    _mm_kernel[groups.grid(n)](
        a, a2, groups.offsets, w, w2, _or(b, w), c,
        e, n, k, w.stride(0), sw_n, sw_k, groups.rows_hint,
        SECOND=second is not None, HAS_BIAS=b is not None,
        PRECISION=dot_precision(a.dtype),
        E_POW2=next_power_of_2(e),
    )  # fmt: skip
    return c


def up_backward(
    dy: torch.Tensor,
    groups: Groups,
    w_out: torch.Tensor,
    pre: torch.Tensor,
    pre_gate: torch.Tensor | None,
    activation: str,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(hidden, d_pre, d_pre_gate, dscale)`` from rows ``dy[groups.rows]`` through ``w_out [E, d, h]`` (any
    strides).

    ``dscale[s] = <dy[row s] W_out[e], hidden[s]>`` in fp32 (only with a ``scale``): the gradient of a
    per-row output weight, less its bias term.
    """
    e, k, n = w_out.shape
    p = groups.num_rows
    hidden = torch.empty_like(pre)
    d_pre = torch.empty_like(pre)
    d_pre_g = torch.empty_like(pre) if pre_gate is not None else None
    # One row of partial sums per column tile (sized for the narrowest tile), summed in a fixed order; a
    # dedicated placeholder otherwise, as autotuning zeroes whatever tensor is passed here.
    shape = (cdiv(n, _MIN_BLOCK_N), p) if scale is not None else (1,)
    partial = torch.zeros(shape, device=dy.device)
    _up_backward_kernel[groups.grid(n)](
        dy, _or(groups.rows, groups.offsets), _or(scale, pre), groups.offsets, w_out, pre, _or(pre_gate, pre),
        hidden, d_pre, _or(d_pre_g, d_pre), partial,
        e, n, k, w_out.stride(0), w_out.stride(2), w_out.stride(1), p, groups.rows_hint,
        GATHER=groups.rows is not None, SCALE=scale is not None, DSCALE=scale is not None,
        GATED=pre_gate is not None, ACT=CODES[activation], PRECISION=dot_precision(dy.dtype),
        E_POW2=next_power_of_2(e),
    )  # fmt: skip
    return hidden, d_pre, d_pre_g, None if scale is None else partial.sum(0)


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    groups: Groups,
    *,
    bias: bool,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW [E, M, N]`` (and ``db [E, M]``) summing ``a^T b`` over each expert's rows (both sorted); ``dW``
    is written into ``out`` (any strides: e.g. one half of a fused gate-up gradient) where given."""
    e = groups.num_experts
    i, j = a.shape[1], b.shape[1]
    if out is not None and (out.shape != (e, i, j) or out.dtype != dtype):
        raise ValueError(f"weight_grad: out is {tuple(out.shape)} {out.dtype}, expected {(e, i, j)} {dtype}")
    dw = torch.empty(e, i, j, device=a.device, dtype=dtype) if out is None else out
    db = torch.empty(e, i, device=a.device, dtype=dtype) if bias else None

    def grid(meta: dict) -> tuple[int, int]:
        return cdiv(i, meta["BLOCK_M"]) * cdiv(j, meta["BLOCK_N"]), e

    _wgrad_kernel[grid](
        a, b, groups.offsets, dw, _or(db, dw), i, j, *dw.stride(), groups.rows_hint,
        HAS_BIAS=bias, PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return dw, db
