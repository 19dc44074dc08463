"""All-to-all exchange of variable-size row blocks, differentiable.

Expert parallelism sends each rank a different number of rows; the backward pass sends the gradients the
same way in reverse, so the exchange is an autograd function whose backward is the transposed exchange.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``send_counts[j]`` rows go to rank ``j``; returns how many rows each rank sends to this one."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return recv_counts


def exchange_rows(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send consecutive blocks of ``rows`` (``send_counts[j]`` rows to rank ``j``); receive blocks in rank
    order. Gradients, if ``rows`` needs them, come back through the reverse exchange."""
    received: torch.Tensor = _AllToAll.apply(rows, send_counts, recv_counts, group)
    return received


def _all_to_all(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.counts = (send_counts, recv_counts)
        ctx.group = group
        return _all_to_all(rows, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        send_counts, recv_counts = ctx.counts
        return _all_to_all(grad, recv_counts, send_counts, ctx.group), None, None, None
