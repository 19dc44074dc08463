"""A plan's pairs sorted by expert with a counting sort, instead of an argsort and a searchsorted per call.

``argsort`` of int64 keys is a multi-pass radix sort (several launches, more at decode sizes than the
GEMMs), and finding each expert's run in its result takes a ``searchsorted``. The experts are few, so a
counting sort does both: a histogram of each chunk's experts, a prefix sum over chunks, and a placement
that writes every sorted array at once. One launch where the pairs fit one chunk (decode sizes), three
otherwise (the histograms, a ``cumsum`` over chunks, the placement).

A pair's sorted position is the start of its expert's run, plus that expert's pairs in earlier chunks, plus
its rank among that expert's pairs in its own chunk (a cumulative sum down a one-hot ``[chunk, E]`` tile):
the sort is stable, the same order as ``argsort(expert_index, stable=True)``.

The combine needs each token's pairs too, listed in a fixed order. A plan that lists exactly ``k`` pairs
per token, token by token (:attr:`RoutingPlan.pairs_per_token`), needs no second sort: token ``t``'s pairs
are the plan's ``t*k`` to ``t*k + k - 1``, so their sorted positions (the inverse of the order, written by
the placement) are the by-token list. Other plans (expert choice, capacity drops) are counted by token
instead of sorted: the placement also counts each (token, expert) cell of an ``[N, E]`` table, one pass
turns every token's row into exclusive prefix sums (a pair's rank among its token's pairs) and its total, a
``cumsum`` gives each token's first slot, and a last pass writes every sorted pair at its token's first slot
plus its rank. A token's pairs come out in expert order, the order of ``argsort(rows, stable=True)`` over
the expert-sorted pairs, since a plan routes a token to an expert at most once. A plan that does so twice
(malformed: the debug checks refuse it) still gets a valid list, the two pairs in either order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixcompile_plugins.triton import cdiv, next_power_of_2

MAX_COUNTED_EXPERTS = 256  # the one-hot tile is [chunk, E]; more experts sort with argsort
MAX_COUNTED_CELLS = 1 << 25  # int32 cells of the [N, E] table (128 MiB); larger plans list by argsort
# A chunk holds _TILE // E_POW2 pairs (the one-hot tile's elements), at most _MAX_CHUNK: at 4096 pairs (two
# experts) the placement with the by-token count spilled on sm_90.
_TILE = 8192
_MAX_CHUNK = 2048
_WARPS = 8
_BY_TOKEN_BLOCK = 1024  # sorted pairs per program of the by-token listing


@triton.jit
def _expert_counts_kernel(
    expert_ptr, counts_ptr, P, E, CHUNKS, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr
):  # fmt: skip
    """``counts[e, c + 1]``: how many pairs of chunk ``c`` go to expert ``e``; column 0 is zeros, so the
    cumulative sum's column ``c`` counts the pairs before chunk ``c``. Chunks along the contiguous
    dimension: a ``cumsum`` over it is one parallel scan per expert, where one down the other dimension
    runs a serial loop over the chunks (measured on an H100: 206 us for 1024 chunks of E64 top-8 pairs)."""
    c = tl.program_id(0)
    pairs = c * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_E)
    expert = tl.load(expert_ptr + pairs, mask=pairs < P, other=-1)
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    row = counts_ptr + cols * (CHUNKS + 1)
    tl.store(row + c + 1, tl.sum(onehot, axis=0), mask=cols < E)
    if c == 0:
        tl.store(row, tl.zeros((BLOCK_E,), tl.int32), mask=cols < E)


@triton.jit
def _place_kernel(
    token_ptr, expert_ptr, weight_ptr, running_ptr,
    order_ptr, rows_ptr, sorted_expert_ptr, sorted_weight_ptr, position_ptr, offsets_ptr, token_offsets_ptr,
    cells_ptr, P, N, E, CHUNKS,
    ONE_CHUNK: tl.constexpr, PAIRS_PER_TOKEN: tl.constexpr, COUNT_CELLS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Writes each pair of chunk ``c`` at its sorted position; ``running [E, CHUNKS + 1]`` is the counts'
    cumulative sum over chunks (column ``c``: each expert's pairs before chunk ``c``; the last: all). With
    ``COUNT_CELLS``, adds one to each pair's (token, expert) cell of the zeroed ``[N, E]`` table."""
    c = tl.program_id(0)
    pairs = c * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = pairs < P
    cols = tl.arange(0, BLOCK_E)
    expert = tl.load(expert_ptr + pairs, mask=valid, other=-1)
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    if ONE_CHUNK:
        total = tl.sum(onehot, axis=0)
        before = tl.zeros((BLOCK_E,), tl.int32)
    else:
        row = running_ptr + cols * (CHUNKS + 1)
        total = tl.load(row + CHUNKS, mask=cols < E, other=0)
        before = tl.load(row + c, mask=cols < E, other=0)
    starts = tl.cumsum(total, axis=0) - total  # each expert's first sorted position
    rank = tl.cumsum(onehot, axis=0) - 1  # in a pair's own expert column: its rank there within the chunk
    dest = tl.sum(onehot * ((starts + before)[None, :] + rank), axis=1)
    token = tl.load(token_ptr + pairs, mask=valid, other=0)
    weight = tl.load(weight_ptr + pairs, mask=valid, other=0.0)
    tl.store(order_ptr + dest, pairs.to(tl.int32), mask=valid)
    tl.store(rows_ptr + dest, token.to(tl.int32), mask=valid)
    tl.store(sorted_expert_ptr + dest, expert.to(tl.int32), mask=valid)
    tl.store(sorted_weight_ptr + dest, weight.to(tl.float32), mask=valid)
    if COUNT_CELLS:  # a pair outside the table (a plan no check saw) is never written past it
        in_table = valid & (token >= 0) & (token < N) & (expert >= 0) & (expert < E)
        tl.atomic_add(cells_ptr + token.to(tl.int64) * E + expert, 1, mask=in_table)
    if c == 0:
        tl.store(offsets_ptr + cols, starts, mask=cols < E)
        tl.store(offsets_ptr + E, P)
    if PAIRS_PER_TOKEN > 0:  # token t's pairs start at t * k; their sorted positions are the by-token list
        tl.store(position_ptr + pairs, dest, mask=valid)
        first = valid & (pairs % PAIRS_PER_TOKEN == 0)
        tl.store(token_offsets_ptr + pairs // PAIRS_PER_TOKEN, pairs, mask=first)
        if c == 0:
            tl.store(token_offsets_ptr + P // PAIRS_PER_TOKEN, P)


@triton.jit
def _token_ranks_kernel(cells_ptr, token_offsets_ptr, N, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each token's row of cell counts becomes exclusive prefix sums over experts (the rank, among the
    token's pairs, of its pair with each expert); ``token_offsets[t + 1]`` gets the token's total, [0] 0."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask = (tokens < N)[:, None] & (cols < E)[None, :]
    cells = cells_ptr + tokens.to(tl.int64)[:, None] * E + cols[None, :]
    counts = tl.load(cells, mask=mask, other=0)
    tl.store(cells, tl.cumsum(counts, axis=1) - counts, mask=mask)
    tl.store(token_offsets_ptr + tokens + 1, tl.sum(counts, axis=1), mask=tokens < N)
    if tl.program_id(0) == 0:
        tl.store(token_offsets_ptr, 0)


@triton.jit
def _list_by_token_kernel(
    rows_ptr, sorted_expert_ptr, cells_ptr, token_offsets_ptr, by_token_ptr, P, N, E, BLOCK_P: tl.constexpr
):  # fmt: skip
    """Sorted pair ``j`` of token ``t`` goes to ``by_token[token_offsets[t] + rank]``; the rank comes from
    its cell, bumped atomically so that two pairs in one cell (a malformed plan) still take two slots."""
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    token = tl.load(rows_ptr + pairs, mask=pairs < P, other=0)
    expert = tl.load(sorted_expert_ptr + pairs, mask=pairs < P, other=0)
    valid = (pairs < P) & (token >= 0) & (token < N) & (expert >= 0) & (expert < E)
    rank = tl.atomic_add(cells_ptr + token.to(tl.int64) * E + expert, 1, mask=valid)
    start = tl.load(token_offsets_ptr + token, mask=valid, other=0)
    tl.store(by_token_ptr + start + rank, pairs, mask=valid)


def packed_size(pairs: int, num_tokens: int, num_experts: int) -> int:
    """Length of :attr:`ByExpert.packed`: order, rows, expert and by-token ``[P]`` each, the expert offsets
    ``[E + 1]`` and the token offsets ``[N + 1]``, in that order."""
    return 4 * pairs + num_experts + num_tokens + 2


def unpacked(
    packed: torch.Tensor, pairs: int, num_tokens: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, rows, expert, by_token, offsets, token_offsets)``: views of a packed index tensor."""
    order, rows, expert, by_token, offsets, token_offsets = packed.split(
        [pairs, pairs, pairs, pairs, num_experts + 1, num_tokens + 1]
    )
    return order, rows, expert, by_token, offsets, token_offsets


@dataclass(frozen=True)
class ByExpert:
    """A plan's pairs in expert order (stable), and each token's pairs in that order.

    The index tensors are views of one int32 tensor, ``packed``: one allocation instead of six at decode
    sizes, and the form a MoE forward saves for its backward, with no copy.
    """

    packed: torch.Tensor  # [4P + E + N + 2] int32: the six index tensors below, in order
    order: torch.Tensor  # [P] int32: the plan's pair index of each sorted pair
    rows: torch.Tensor  # [P] int32: token of each sorted pair
    expert: torch.Tensor  # [P] int32: expert of each sorted pair
    by_token: torch.Tensor  # [P] int32: sorted positions, token by token
    offsets: torch.Tensor  # [E + 1] int32: expert e's pairs are sorted positions offsets[e]:offsets[e + 1]
    token_offsets: torch.Tensor  # [N + 1] int32: token t's pairs are by_token[token_offsets[t]:[t + 1]]
    weight: torch.Tensor  # [P] fp32: routing weight of each sorted pair

    @classmethod
    def of(cls, packed: torch.Tensor, weight: torch.Tensor, num_tokens: int, num_experts: int) -> ByExpert:
        return cls(packed, *unpacked(packed, weight.numel(), num_tokens, num_experts), weight)


def sort_by_expert(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    pairs_per_token: int,
) -> ByExpert:
    """The pairs in expert order and each token's list; ``pairs_per_token > 0`` declares that the plan lists
    exactly that many pairs per token, token by token."""
    p = expert_index.numel()
    fixed = pairs_per_token > 0
    if num_experts > MAX_COUNTED_EXPERTS or (not fixed and num_tokens * num_experts > MAX_COUNTED_CELLS):
        return _argsort_by_expert(token_index, expert_index, weight, num_tokens, num_experts, pairs_per_token)
    device = expert_index.device
    packed = torch.empty(packed_size(p, num_tokens, num_experts), device=device, dtype=torch.int32)
    sorted_weight = torch.empty(p, device=device, dtype=torch.float32)
    out = ByExpert.of(packed, sorted_weight, num_tokens, num_experts)
    # the [N, E] table the by-token count needs (unread with pairs_per_token: no allocation, no fill)
    cells = out.offsets if fixed else torch.zeros(num_tokens * num_experts, device=device, dtype=torch.int32)
    block_e = next_power_of_2(num_experts)
    block_p = min(_TILE // block_e, _MAX_CHUNK)
    chunks = max(1, cdiv(p, block_p))
    running = out.offsets  # unread with one chunk
    if chunks > 1:
        counts = torch.empty(num_experts, chunks + 1, device=device, dtype=torch.int32)
        _expert_counts_kernel[(chunks,)](
            expert_index, counts, p, num_experts, chunks, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=_WARPS
        )
        running = counts.cumsum_(1)
    _place_kernel[(chunks,)](
        token_index, expert_index, weight, running,
        out.order, out.rows, out.expert, sorted_weight, out.by_token, out.offsets, out.token_offsets, cells,
        p, num_tokens, num_experts, chunks,
        ONE_CHUNK=chunks == 1, PAIRS_PER_TOKEN=max(pairs_per_token, 0), COUNT_CELLS=not fixed,
        BLOCK_P=block_p, BLOCK_E=block_e, num_warps=_WARPS,
    )  # fmt: skip
    if not fixed:
        _list_by_token(out.rows, out.expert, cells, out.by_token, out.token_offsets, num_experts)
    return out


def _list_by_token(
    rows: torch.Tensor,
    expert: torch.Tensor,
    cells: torch.Tensor,
    by_token: torch.Tensor,
    token_offsets: torch.Tensor,
    num_experts: int,
) -> None:
    """Fills ``by_token`` and ``token_offsets`` from the cell counts (see the module docstring)."""
    num_tokens = token_offsets.numel() - 1
    if num_tokens == 0:
        token_offsets.zero_()
        return
    block_e = next_power_of_2(num_experts)
    block_t = max(1, _TILE // block_e)
    _token_ranks_kernel[(cdiv(num_tokens, block_t),)](
        cells, token_offsets, num_tokens, num_experts, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=_WARPS
    )
    token_offsets.cumsum_(0)
    p = rows.numel()
    if p:
        _list_by_token_kernel[(cdiv(p, _BY_TOKEN_BLOCK),)](
            rows, expert, cells, token_offsets, by_token, p, num_tokens, num_experts, BLOCK_P=_BY_TOKEN_BLOCK
        )


def _argsort_by_expert(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    pairs_per_token: int,
) -> ByExpert:
    """The same with ``argsort`` and ``searchsorted``: for more experts than a one-hot tile holds, or more
    (token, expert) cells than the table is allowed."""
    order = torch.argsort(expert_index, stable=True)
    expert = expert_index[order]
    rows = token_index[order].to(torch.int32)
    offsets = segment_starts(expert, num_experts)
    p = order.numel()
    if pairs_per_token > 0:
        by_token = torch.empty(p, device=order.device, dtype=torch.int32)
        by_token[order] = torch.arange(p, device=order.device, dtype=torch.int32)
        token_offsets = torch.arange(0, p + 1, pairs_per_token, device=order.device, dtype=torch.int32)
    else:
        by_token = torch.argsort(rows, stable=True).to(torch.int32)
        token_offsets = segment_starts(rows[by_token], num_tokens)
    parts = (order, rows, expert, by_token, offsets, token_offsets)
    packed = torch.cat([t.to(torch.int32) for t in parts])
    return ByExpert.of(packed, weight[order].float(), num_tokens, num_experts)


def segment_starts(sorted_keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[num_keys + 1]`` int32 start of each key's run in ``sorted_keys`` (no host sync, unlike bincount)."""
    keys = torch.arange(num_keys + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, keys).to(torch.int32)
