"""Benchmark the fused Triton kernels against the torch reference, a dense FFN and ``torch._grouped_mm``.

On a GPU: first checks the Triton kernel against the torch reference at every benchmarked size (output and
gradients), then prints one table (bf16, 16,384 tokens, d=1024) of time, TFLOP/s, the ratio to the Triton
kernel and peak memory, all measured in this run. MoE rows include routing (gate, softmax, top-k: the fused
routing step for the Triton kernel, as the block runs it); MoT rows include the controller. ``--smoke`` runs
tiny sizes, on CPU through Triton's interpreter, to check that the script works; without a GPU and without
``--smoke`` it says so and exits.

    python benchmarks/bench_kernels.py           # on a GPU
    python benchmarks/bench_kernels.py --smoke   # anywhere
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sizes:
    tokens: int
    d: int
    moe: tuple[tuple[int, int, int], ...]  # (experts, top_k, hidden)
    mot: tuple[tuple[int, int, int, int, int], ...]  # (group, experts, hidden, batch, seq)
    dtype: torch.dtype


FULL = Sizes(
    16384,
    1024,
    ((8, 2, 4096), (64, 8, 512)),
    ((16, 32, 512, 16, 1024), (32, 32, 512, 16, 1024)),
    torch.bfloat16,
)
SMOKE = Sizes(48, 32, ((4, 2, 48),), ((2, 4, 32, 5, 6),), torch.float32)


@dataclass
class Row:
    workload: str
    mode: str
    impl: str
    ms: float | None
    flops: float
    peak_gib: float | None
    note: str = ""


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Median milliseconds and the peak memory (GiB) above what was allocated before the call.

    On CPU (the smoke run, in the interpreter) one call is timed and memory is not tracked.
    """
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, None
    import triton.testing

    fn()  # compile / autotune outside the timed and the measured region
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------- MoE


class MoEProblem:
    """A top-k router and stacked experts; ``step(impl, backward)`` routes then runs one implementation."""

    def __init__(self, sizes: Sizes, experts: int, top_k: int, hidden: int, device: torch.device) -> None:
        from mixcompile.runtime.experts import StackedExperts

        g = torch.Generator(device="cpu").manual_seed(0)
        self.top_k = top_k
        self.x = (
            (torch.randn(sizes.tokens, sizes.d, generator=g) * 0.5).to(device, sizes.dtype).requires_grad_()
        )
        self.gate = torch.nn.Linear(sizes.d, experts, bias=False, device=device, dtype=sizes.dtype)
        self.experts = StackedExperts(
            experts, sizes.d, hidden, activation="gelu", device=device, dtype=sizes.dtype
        )
        self.dy = torch.randn(self.x.shape, generator=g).to(device, sizes.dtype)
        self.params = [self.x, self.gate.weight, *self.experts.parameters()]

    def plan(self, fused: bool):
        """Top-k routing as the block does it: the fused Triton step for the Triton kernel, else PyTorch."""
        from mixcompile.runtime.routing import RoutingPlan

        logits = self.gate(self.x).float()
        if fused:
            from mixcompile_plugins.triton.ops import topk_route_op

            _, chosen, weight = topk_route_op(logits, None, self.top_k, True)
        else:
            probs = torch.softmax(logits, dim=-1)
            weight, chosen = torch.topk(probs, self.top_k, dim=-1)
            weight = weight / weight.sum(-1, keepdim=True)
        n, e = self.x.shape[0], self.experts.num_experts
        tokens = torch.arange(n, device=self.x.device).repeat_interleave(self.top_k)
        return RoutingPlan(tokens, chosen.reshape(-1), weight.reshape(-1), n, e)

    def run(
        self, impl: Callable, backward: bool, fused_routing: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Forward (under ``no_grad`` unless ``backward``), or forward and backward."""
        for p in self.params:
            p.grad = None
        with torch.set_grad_enabled(backward):
            y = impl(self.x, self.plan(fused_routing), self.experts)
        if backward:
            y.backward(self.dy)
        return y, [p.grad for p in self.params]


def grouped_mm_moe(x: torch.Tensor, plan, experts) -> torch.Tensor:
    """torchtitan-style MoE on ``torch._grouped_mm`` (plain experts): sort, gather, two grouped GEMMs."""
    order = torch.argsort(plan.expert_index, stable=True)
    tokens = plan.token_index[order]
    counts = torch.bincount(plan.expert_index, minlength=experts.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hidden = torch._grouped_mm(x[tokens], experts.w_in.transpose(-2, -1), offs=offs)
    out = torch._grouped_mm(F.gelu(hidden), experts.w_out.transpose(-2, -1), offs=offs)
    out = out * plan.weight[order].to(out.dtype)[:, None]
    return torch.zeros_like(x).index_add(0, tokens, out)


def dense_ffn(d: int, hidden: int, device: torch.device, dtype: torch.dtype) -> Callable:
    w_in = torch.randn(hidden, d, device=device, dtype=dtype, requires_grad=True) / math.sqrt(d)
    w_out = torch.randn(d, hidden, device=device, dtype=dtype, requires_grad=True) / math.sqrt(hidden)
    return lambda x: F.linear(F.gelu(F.linear(x, w_in)), w_out)


def dense_step(dense: Callable, problem: MoEProblem, backward: bool) -> None:
    with torch.set_grad_enabled(backward):
        y = dense(problem.x)
    if backward:
        y.backward(problem.dy)


def moe_rows(sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> list[Row]:
    rows = []
    for experts, top_k, hidden in sizes.moe:
        problem = MoEProblem(sizes, experts, top_k, hidden, device)
        name = f"MoE E={experts} top-{top_k} h={hidden}"
        y_ref, g_ref = problem.run(impls["torch"], backward=True)
        y, g = problem.run(impls["triton"], backward=True, fused_routing=True)
        errors = [rel_err(y, y_ref)] + [rel_err(a, b) for a, b in zip(g, g_ref, strict=True)]
        print(f"check {name}: max relative error (output, grads) {max(errors):.1e}", flush=True)
        if max(errors) > (2e-2 if sizes.dtype != torch.float32 else 1e-4):
            sys.exit(f"{name}: the Triton kernel does not match the torch reference")
        fwd_flops = 4.0 * sizes.tokens * top_k * sizes.d * hidden
        dense = dense_ffn(sizes.d, top_k * hidden, device, sizes.dtype)
        for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3 * fwd_flops)):
            for impl_name, impl in impls.items():
                ms, peak = timed(partial(problem.run, impl, backward, impl_name == "triton"), device)
                rows.append(Row(name, mode, impl_name, ms, flops, peak))

            ms, peak = timed(partial(dense_step, dense, problem, backward), device)
            rows.append(Row(name, mode, f"dense h={top_k * hidden}", ms, flops, peak, "no routing"))
    return rows


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """``measure``, or no figure where an implementation cannot run here (``_grouped_mm`` before Hopper)."""
    try:
        return measure(fn, device)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        return None, None


# ------------------------------------------------------------------------------------------------- MoT


class MoTProblem:
    """``x [B, T, d]`` grouped as the MoT block does, a softmax controller and stacked experts."""

    def __init__(
        self, sizes: Sizes, group: int, experts: int, hidden: int, batch: int, seq: int, device
    ) -> None:
        from mixcompile.plugins.manager import lookup
        from mixcompile.runtime.experts import StackedExperts

        g = torch.Generator(device="cpu").manual_seed(1)
        self.group = group
        self.x = (
            (torch.randn(batch, seq, sizes.d, generator=g) * 0.5).to(device, sizes.dtype).requires_grad_()
        )
        self.mixer = lookup("mixer", "softmax").factory(sizes.d, experts, group).to(device, sizes.dtype)
        self.experts = StackedExperts(
            experts, sizes.d, hidden, activation="gelu", device=device, dtype=sizes.dtype
        )
        self.dy = torch.randn(self.x.shape, generator=g).to(device, sizes.dtype)
        self.params = [self.x, *self.mixer.parameters(), *self.experts.parameters()]

    def run(self, impl: Callable, backward: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        for p in self.params:
            p.grad = None
        batch, seq, d = self.x.shape
        groups = math.ceil(batch / self.group)
        with torch.set_grad_enabled(backward):
            xb = torch.cat([self.x, self.x.new_zeros(groups * self.group - batch, seq, d)])
            x_g = xb.reshape(groups, self.group, seq, d).permute(2, 0, 1, 3)
            present = (torch.arange(groups * self.group, device=xb.device) < batch).reshape(
                groups, self.group
            )
            y_g = impl(x_g, self.mixer(x_g, present, sparse=False), self.experts)
            y = y_g.permute(1, 2, 0, 3).reshape(groups * self.group, seq, d)[:batch]
        if backward:
            y.backward(self.dy)
        return y, [p.grad for p in self.params]


def mot_rows(sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> list[Row]:
    rows = []
    for group, experts, hidden, batch, seq in sizes.mot:
        problem = MoTProblem(sizes, group, experts, hidden, batch, seq, device)
        name = f"MoT G={group} E={experts} h={hidden} (B={batch}, T={seq})"
        y_ref, g_ref = problem.run(impls["torch"], backward=True)
        y, g = problem.run(impls["triton"], backward=True)
        errors = [rel_err(y, y_ref)] + [rel_err(a, b) for a, b in zip(g, g_ref, strict=True)]
        print(f"check {name}: max relative error (output, grads) {max(errors):.1e}", flush=True)
        if max(errors) > (2e-2 if sizes.dtype != torch.float32 else 1e-4):
            sys.exit(f"{name}: the Triton kernel does not match the torch reference")
        rows_per_expert = seq * math.ceil(batch / group)
        flops = 3 * (
            4.0 * experts * rows_per_expert * sizes.d * hidden + 4.0 * batch * seq * experts * sizes.d
        )
        for impl_name in ("triton", "torch"):
            impl = impls[impl_name]
            ms, peak = timed(partial(problem.run, impl, True), device)
            label = "einsum reference" if impl_name == "torch" else impl_name
            rows.append(Row(name, "fwd+bwd", label, ms, flops, peak))
    return rows


# ----------------------------------------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    """One table; ``x triton`` is each implementation's time over the Triton kernel's (>1: Triton faster)."""
    triton_ms = {(r.workload, r.mode): r.ms for r in rows if r.impl == "triton"}
    columns = ("workload", 40), ("pass", 8), ("implementation", 18)
    figures = ("ms", "TFLOP/s", "x triton", "peak GiB")
    header = " ".join(f"{c:{w}}" for c, w in columns) + "".join(f"{f:>10}" for f in figures)
    print(header)
    print("-" * len(header))
    for r in rows:
        base = triton_ms.get((r.workload, r.mode))
        ms = f"{r.ms:10.3f}" if r.ms is not None else f"{'n/a':>10}"
        tflops = f"{r.flops / r.ms / 1e9:10.1f}" if r.ms else f"{'n/a':>10}"
        ratio = f"{r.ms / base:10.2f}" if r.ms and base else f"{'n/a':>10}"
        peak = f"{r.peak_gib:10.2f}" if r.peak_gib is not None else f"{'n/a':>10}"
        note = f"  ({r.note})" if r.note else ""
        print(f"{r.workload:40} {r.mode:8} {r.impl:18}{ms}{tflops}{ratio}{peak}{note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; on CPU through the Triton interpreter"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_kernels: no CUDA device; nothing to benchmark (use --smoke to check the script on CPU).")
        return 0
    if not cuda:  # before Triton is first imported: it reads the variable when kernels are decorated
        os.environ["TRITON_INTERPRET"] = "1"
    from mixcompile.plugins.manager import registry
    from mixcompile.runtime.kernels import get_kernel

    if "triton" not in registry().names("kernel"):
        import mixcompile_plugins.triton.plugin
        from mixcompile import register_plugin

        register_plugin(mixcompile_plugins.triton_kernels)
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if cuda else "cpu")
    triton_kernel, torch_kernel = get_kernel("triton"), get_kernel("torch")
    moe_impls: dict[str, Callable] = {"triton": triton_kernel.moe, "torch": torch_kernel.moe}
    if hasattr(torch, "_grouped_mm") and cuda:
        moe_impls["torch._grouped_mm"] = grouped_mm_moe
    mot_impls = {"triton": triton_kernel.mot, "torch": torch_kernel.mot}
    print(
        f"{torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter)'}, torch {torch.__version__}, "
        f"{sizes.dtype}, {sizes.tokens} tokens, d={sizes.d}; fwd rows run under no_grad"
    )
    rows = moe_rows(sizes, device, moe_impls) + mot_rows(sizes, device, mot_impls)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
