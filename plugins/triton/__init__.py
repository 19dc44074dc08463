"""Fused Triton kernels for MoE and MoT blocks.

The submodules import ``triton`` and decide at import time whether kernels are compiled for the GPU or run
by Triton's CPU interpreter: set ``TRITON_INTERPRET=1`` *before* importing them to run on CPU tensors.
This package itself imports nothing heavy, so ``mixcompile`` stays importable without Triton.

- ``activations``: the activation epilogues (value and derivative) for every name in
  :data:`mixcompile.runtime.activations.ACTIVATIONS`.
- ``grouped``: grouped GEMMs over rows sorted by expert, shared by the MoE and MoT kernels.
- ``moe_kernels`` / ``mot_kernels``: the forward and backward passes built from them.
- ``routing_kernels``: the fused top-k routing step (softmax, selection bias, top-k, renormalisation).
- ``ops``: ``torch.library`` custom ops (with fake and autograd registrations) that blocks call.
"""

from __future__ import annotations

import os

MAX_ROUTED_EXPERTS = 4096  # the fused routing step holds a row of logits in registers


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read as Triton reads ``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


# Host code sizes its grids and tiles with these rather than ``triton.cdiv`` / ``triton.next_power_of_2``,
# which Triton 3.9 wraps as ConstexprFunctions: about 6 us a call on this project's CPU machine, against
# 0.06 us here, and a MoE call made about ten (host time is the step time at decode sizes).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()
