"""Benchmark the fused Triton kernels against the torch reference, a dense FFN and ``torch._grouped_mm``.

On a GPU: first checks the Triton kernel against the torch reference at every benchmarked size (the output
with and without grad, and every gradient, with outputs poisoned with NaN so an unwritten element fails),
then measures (bf16, 16,384 tokens, d=1024) time, TFLOP/s, the ratio to the Triton kernel and peak memory,
all in this run, section by section, the rows the kernel notes aim at first: the MoE and MoT workloads
(MoE rows include routing, gate, softmax and top-k: the fused routing step for the Triton kernel, as the
block runs it; MoT rows include the controller, and their training step is also replayed from a CUDA graph,
pass "graph", which says how much of its eager time is the host's), decode-sized MoE forwards (1 to 512
tokens; eager, where the host's time dominates, and replayed from a CUDA graph for the Triton kernel and
``torch._grouped_mm``), a dense FFN (h=4096, the reference rate), the host's time per launch (an ATen op, a
plain and an autotuned Triton kernel), each implementation's MoE and MoT training step profiled kernel by
kernel (so the next change can aim at the largest), the routing's sort of the pairs alone (the counting sort
with and without ``pairs_per_token`` against the argsort-based sort it replaced), and one MoE workload in
fp32 at torch's default "highest" matmul precision. Each row and profile is printed as soon as it is
measured and ``--json`` rewrites its file after each (a run killed at its time limit keeps what it
measured; ``complete`` lists the sections that finished); the whole table is printed again at the end.
``--deadline SECONDS`` (or ``BENCH_DEADLINE``) skips, with a note, each section that would not finish in
what is left of that many seconds, so a time-limited run exits on its own with what it has. Exits 1 if a
check or a section fails. ``--smoke`` runs tiny sizes, on CPU through Triton's interpreter, to check that
the script works; without a GPU and without ``--smoke`` it says so and exits.

    python benchmarks/bench_kernels.py --json out.json   # on a GPU
    python benchmarks/bench_kernels.py --only mot        # one section (repeatable), in seconds
    python benchmarks/bench_kernels.py --smoke           # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from bench_graphs import replayed
from bench_profile import print_profiles, print_tuned, profiled, tuned_configs


@dataclass(frozen=True)
class Sizes:
    tokens: int
    d: int
    dense_hidden: int
    moe: tuple[tuple[int, int, int], ...]  # (experts, top_k, hidden)
    mot: tuple[tuple[int, int, int, int, int], ...]  # (group, experts, hidden, batch, seq)
    decode: tuple[int, ...]  # token counts of the inference-only MoE rows
    dtype: torch.dtype

    @property
    def tol(self) -> float:
        """Relative error allowed against the torch reference in the same dtype."""
        return 2e-2 if self.dtype != torch.float32 else 1e-4


FULL = Sizes(
    16384,
    1024,
    4096,
    ((8, 2, 4096), (64, 8, 512)),
    ((16, 32, 512, 16, 1024), (32, 32, 512, 16, 1024)),
    (1, 8, 64, 512),
    torch.bfloat16,
)
SMOKE = Sizes(48, 32, 64, ((4, 2, 48),), ((2, 4, 32, 5, 6),), (1, 8), torch.float32)
# The sections in the order they run: the rows the kernel notes aim at first, so a run cut short has them.
SECTIONS = ("moe", "mot", "decode", "dense", "launch", "profile", "routing", "fp32")
# Seconds each section needs (on one H100, warmed by the GPU tests; on the smoke run's CPU), for --deadline:
# estimates from the runs of 2026-11-27/28, to be replaced by the times each run prints and writes.
NEEDS = {
    "full": {"moe": 45, "mot": 25, "decode": 45, "dense": 5, "launch": 10, "profile": 40, "routing": 25,
             "fp32": 45},
    "smoke": {"moe": 10, "mot": 5, "decode": 3, "dense": 1, "launch": 1, "profile": 10, "routing": 2},
}  # fmt: skip


@dataclass
class Row:
    workload: str
    mode: str
    impl: str
    ms: float | None
    flops: float
    peak_gib: float | None
    note: str = ""
    section: str = ""  # set when the row is recorded


@dataclass
class Check:
    """One tensor of the Triton kernel against the torch reference: relative error of the norm."""

    workload: str
    tensor: str
    rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tol  # False for NaN


CHECKS: list[Check] = []


def check(workload: str, got: list, want: list, names: list[str], tol: float) -> float:
    """Record one check per tensor (an absent gradient must be absent in both); the largest error.

    A non-finite value anywhere in ``got`` makes the error NaN, which fails (``NaN <= tol`` is False); so
    does an all-zero reference, against which any all-zero result would pass (every tensor of these
    workloads is non-zero).
    """
    worst = 0.0
    for name, a, b in zip(names, got, want, strict=True):
        if a is None or b is None:
            err = 0.0 if a is None and b is None else math.nan
        else:
            a, b = a.detach().double(), b.detach().double()
            usable = bool(torch.isfinite(a).all()) and bool(b.norm() > 0)
            err = float((a - b).norm() / b.norm()) if usable else math.nan
        CHECKS.append(Check(workload, name, err, tol))
        worst = err if math.isnan(err) or math.isnan(worst) else max(worst, err)
    return worst


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill every ``torch.empty`` with NaN (the kernels' outputs are allocated so), so any element a kernel
    fails to write makes its check fail."""
    import torch.utils.deterministic

    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def measure(fn: Callable[[], object], device: torch.device, rep: int = 100) -> tuple[float, float | None]:
    """Median milliseconds over ``rep`` ms of calls and the peak memory (GiB) above what was allocated before
    the call.

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
    ms = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    return ms, peak


def timed(
    fn: Callable[[], object], device: torch.device, rep: int = 100
) -> tuple[float | None, float | None]:
    """``measure``, or no figure where an implementation cannot run here (``_grouped_mm`` before Hopper)."""
    try:
        return measure(fn, device, rep)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        return None, None


ROUNDS = 5  # host-bound rows: implementations timed in turn, this many rounds


def timed_in_turn(
    steps: dict[str, Callable[[], object]], device: torch.device
) -> dict[str, tuple[float | None, float | None]]:
    """``timed`` for each step, host-bound ones: on a GPU they take turns for ``ROUNDS`` rounds and each
    figure is the median of its rounds, as the host's time drifts over a run (by up to 0.45 ms on the same
    row 15 minutes apart, 2026-11-27); timed one after the other, a drift favoured whichever came first."""
    rounds = ROUNDS if device.type == "cuda" else 1
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float | None] = {}
    for _ in range(rounds):
        for name, step in steps.items():
            if name in peaks and not times[name]:
                continue  # could not run here: said once
            ms, peak = timed(step, device, 100 // rounds)
            if ms is not None:
                times[name].append(ms)
                peaks[name] = peak
            else:
                peaks.setdefault(name, None)
    return {name: (statistics.median(t) if t else None, peaks[name]) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------- MoE


class MoEProblem:
    """A top-k router and stacked experts; ``run(impl, backward)`` routes then runs one implementation."""

    def __init__(
        self, sizes: Sizes, tokens: int, experts: int, top_k: int, hidden: int, device: torch.device
    ) -> None:
        from mixcompile.runtime.experts import StackedExperts

        g = torch.Generator(device="cpu").manual_seed(0)
        self.top_k = top_k
        self.x = (torch.randn(tokens, sizes.d, generator=g) * 0.5).to(device, sizes.dtype).requires_grad_()
        self.gate = torch.nn.Linear(sizes.d, experts, bias=False, device=device, dtype=sizes.dtype)
        # Drawn on the CPU: a failed CUDA-graph capture can leave the CUDA generator refusing every draw.
        self.experts = StackedExperts(experts, sizes.d, hidden, activation="gelu", dtype=sizes.dtype).to(
            device
        )
        self.dy = torch.randn(self.x.shape, generator=g).to(device, sizes.dtype)
        self.params = [self.x, self.gate.weight, *self.experts.parameters()]
        experts_grads = [f"grad {n}" for n, _ in self.experts.named_parameters()]
        self.names = ["output", "grad x", "grad gate", *experts_grads]

    def plan(self, fused: bool):
        """Top-k routing as the block does it: the fused Triton step for the Triton kernel, else PyTorch."""
        from mixcompile.runtime.routing import RoutingPlan

        logits = self.gate(self.x).float()
        if fused:
            from mixcompile_plugins.triton.ops import fused_topk_route

            _, chosen, weight = fused_topk_route(logits, None, self.top_k, True)
        else:
            probs = torch.softmax(logits, dim=-1)
            weight, chosen = torch.topk(probs, self.top_k, dim=-1)
            weight = weight / weight.sum(-1, keepdim=True)
        n, e = self.x.shape[0], self.experts.num_experts
        tokens = torch.arange(n, device=self.x.device).repeat_interleave(self.top_k)
        return RoutingPlan(tokens, chosen.reshape(-1), weight.reshape(-1), n, e, pairs_per_token=self.top_k)

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
        # Detached: a graph kept alive by a returned output holds the leaves' gradient accumulators, made
        # on the stream of that run, and a CUDA-graph capture on another stream then fails on them.
        return y.detach(), [p.grad for p in self.params]


def grouped_mm_moe(x: torch.Tensor, plan, experts) -> torch.Tensor:
    """torchtitan-style MoE on ``torch._grouped_mm`` (plain experts): sort, gather, two grouped GEMMs; no
    host sync (``torch.bincount`` would read its size back), so it can be captured in a CUDA graph."""
    from mixcompile.runtime.routing import fixed_bincount

    order = torch.argsort(plan.expert_index, stable=True)
    tokens = plan.token_index[order]
    counts = fixed_bincount(plan.expert_index, experts.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hidden = torch._grouped_mm(x[tokens], experts.w_in.transpose(-2, -1), offs=offs)
    out = torch._grouped_mm(F.gelu(hidden), experts.w_out.transpose(-2, -1), offs=offs)
    out = out * plan.weight[order].to(out.dtype)[:, None]
    return torch.zeros_like(x).index_add(0, tokens, out)


def dense_ffn(d: int, hidden: int, device: torch.device, dtype: torch.dtype) -> Callable:
    # Leaves: a weight computed from a leaf would carry a graph that the first backward frees.
    w_in = (torch.randn(hidden, d, device=device, dtype=dtype) / math.sqrt(d)).requires_grad_()
    w_out = (torch.randn(d, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    return lambda x: F.linear(F.gelu(F.linear(x, w_in)), w_out)


def dense_step(dense: Callable, x: torch.Tensor, dy: torch.Tensor, backward: bool) -> None:
    with torch.set_grad_enabled(backward):
        y = dense(x)
    if backward:
        y.backward(dy)


def dense_rows(report: Report, sizes: Sizes, device: torch.device) -> None:
    """The dense FFN the MoE workloads are measured against (its TFLOP/s is the reference rate)."""
    x = torch.randn(sizes.tokens, sizes.d, device=device, dtype=sizes.dtype, requires_grad=True)
    dense = dense_ffn(sizes.d, sizes.dense_hidden, device, sizes.dtype)
    fwd_flops = 4.0 * sizes.tokens * sizes.d * sizes.dense_hidden
    for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3 * fwd_flops)):
        ms, peak = timed(partial(dense_step, dense, x, torch.randn_like(x), backward), device)
        report.row(Row(f"dense FFN h={sizes.dense_hidden}", mode, "torch", ms, flops, peak))


def moe_name(prefix: str, experts: int, top_k: int, hidden: int) -> str:
    return f"{prefix}MoE E={experts} top-{top_k} h={hidden}"


def moe_rows(
    report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable], prefix: str = ""
) -> None:
    for experts, top_k, hidden in sizes.moe:
        problem = MoEProblem(sizes, sizes.tokens, experts, top_k, hidden, device)
        name = moe_name(prefix, experts, top_k, hidden)
        with poisoned():
            y_ref, g_ref = problem.run(impls["torch"], backward=True)
            y, g = problem.run(impls["triton"], backward=True, fused_routing=True)
            worst = check(name, [y, *g], [y_ref, *g_ref], problem.names, sizes.tol)
            y_infer, _ = problem.run(impls["triton"], backward=False, fused_routing=True)
            check(name, [y_infer], [y_ref], ["output without grad"], sizes.tol)
        print(f"check {name}: max relative error (output, grads) {worst:.1e}", flush=True)
        fwd_flops = 4.0 * sizes.tokens * top_k * sizes.d * hidden
        dense = dense_ffn(sizes.d, top_k * hidden, device, sizes.dtype)
        for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3 * fwd_flops)):
            for impl_name, impl in impls.items():
                ms, peak = timed(partial(problem.run, impl, backward, impl_name == "triton"), device)
                report.row(Row(name, mode, impl_name, ms, flops, peak))
            step = partial(dense_step, dense, problem.x, problem.dy, backward)
            ms, peak = timed(step, device)
            report.row(Row(name, mode, f"dense h={top_k * hidden}", ms, flops, peak, "no routing"))


def moe_profiles(
    report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable], prefix: str = ""
) -> None:
    """Each implementation's MoE training step, kernel by kernel."""
    for experts, top_k, hidden in sizes.moe:
        problem = MoEProblem(sizes, sizes.tokens, experts, top_k, hidden, device)
        name = moe_name(prefix, experts, top_k, hidden)
        for impl_name, impl in impls.items():
            step = partial(problem.run, impl, True, impl_name == "triton")
            report.profile(f"{name}, fwd+bwd, {impl_name}", step, device)


def decode_rows(report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> None:
    """Inference at decode sizes: where launch count and per-launch overhead, not FLOPs, set the time."""
    for experts, top_k, hidden in sizes.moe:
        for tokens in sizes.decode:
            problem = MoEProblem(sizes, tokens, experts, top_k, hidden, device)
            name = f"decode E={experts} top-{top_k} h={hidden}, {tokens} tok"
            with poisoned():
                y_ref, _ = problem.run(impls["torch"], backward=False)
                y, _ = problem.run(impls["triton"], backward=False, fused_routing=True)
                worst = check(name, [y], [y_ref], ["output without grad"], sizes.tol)
            print(f"check {name}: relative error (output) {worst:.1e}", flush=True)
            flops = 4.0 * tokens * top_k * sizes.d * hidden
            steps = {n: partial(problem.run, impl, False, n == "triton") for n, impl in impls.items()}
            for impl_name, (ms, peak) in timed_in_turn(steps, device).items():
                report.row(Row(name, "fwd", impl_name, ms, flops, peak))
            for impl_name in ("triton", "torch._grouped_mm"):  # the decode target's pair, captured
                if device.type == "cuda" and impl_name in impls:
                    step = partial(problem.run, impls[impl_name], False, impl_name == "triton")
                    report.row(Row(name, "graph", impl_name, replayed(step), flops, None))


# --------------------------------------------------------------------------------------------- routing


def routing_rows(report: Report, sizes: Sizes, device: torch.device) -> None:
    """The pairs' sort alone (``route``: by expert, and each token's pairs for the combine) at the smallest,
    a middle and the largest size: the counting sort with ``pairs_per_token`` (what routers and transformers'
    experts declare), without it (plus the count by token that expert choice and capacity drops take), and
    the argsort-based sort it replaced (two stable argsorts, two ``searchsorted``), eager and replayed from a
    CUDA graph: the routing's share of the MoE and decode rows."""
    from mixcompile_plugins.triton.moe_kernels import route
    from mixcompile_plugins.triton.sorting import segment_starts

    def argsorted(token, expert, weight, n, e):
        order = torch.argsort(expert, stable=True)
        rows_ = token[order]
        by_token = torch.argsort(rows_, stable=True)
        offsets, token_offsets = segment_starts(expert[order], e), segment_starts(rows_[by_token], n)
        return order, offsets, by_token.int(), token_offsets, weight[order].float()

    for experts, top_k, _ in sizes.moe:
        for tokens in (sizes.decode[0], sizes.decode[len(sizes.decode) // 2], sizes.tokens):
            g = torch.Generator().manual_seed(tokens)
            chosen = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k].reshape(-1).to(device)
            token = torch.arange(tokens, device=device).repeat_interleave(top_k)
            weight = torch.rand(tokens * top_k, generator=g).to(device)
            name = f"routing E={experts} top-{top_k}, {tokens} tok"
            impls = {
                "triton": partial(route, token, chosen, weight, tokens, experts, top_k),
                "triton, by token": partial(route, token, chosen, weight, tokens, experts, 0),
                "argsort": partial(argsorted, token, chosen, weight, tokens, experts),
            }
            with poisoned():
                got, counted, ref = impls["triton"](), impls["triton, by token"](), impls["argsort"]()
                check(name, [got.order, got.offsets], [ref[0], ref[1]], ["order", "offsets"], 0.0)
                check(
                    f"{name}, by token",
                    [counted.order, counted.offsets, counted.by_token, counted.token_offsets],
                    list(ref[:4]),
                    ["order", "offsets", "by_token", "token_offsets"],
                    0.0,
                )
            for impl_name, fn in impls.items():
                report.row(Row(name, "sort", impl_name, timed(fn, device)[0], 0.0, None))
                if device.type == "cuda":
                    report.row(Row(name, "graph", impl_name, replayed(fn), 0.0, None))


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
        # Drawn on the CPU: a failed CUDA-graph capture can leave the CUDA generator refusing every draw.
        self.experts = StackedExperts(experts, sizes.d, hidden, activation="gelu", dtype=sizes.dtype).to(
            device
        )
        self.dy = torch.randn(self.x.shape, generator=g).to(device, sizes.dtype)
        self.params = [self.x, *self.mixer.parameters(), *self.experts.parameters()]
        self.names = [
            "output", "grad x", *(f"grad mixer.{n}" for n, _ in self.mixer.named_parameters()),
            *(f"grad {n}" for n, _ in self.experts.named_parameters()),
        ]  # fmt: skip

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
        # Detached: a graph kept alive by a returned output holds the leaves' gradient accumulators, made
        # on the stream of that run, and a CUDA-graph capture on another stream then fails on them.
        return y.detach(), [p.grad for p in self.params]


MOT_LABELS = {"triton": "triton", "torch": "einsum reference"}


def mot_name(group: int, experts: int, hidden: int, batch: int, seq: int) -> str:
    return f"MoT G={group} E={experts} h={hidden} (B={batch}, T={seq})"


def mot_rows(report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> None:
    for group, experts, hidden, batch, seq in sizes.mot:
        problem = MoTProblem(sizes, group, experts, hidden, batch, seq, device)
        name = mot_name(group, experts, hidden, batch, seq)
        with poisoned():
            y_ref, g_ref = problem.run(impls["torch"], backward=True)
            y, g = problem.run(impls["triton"], backward=True)
            worst = check(name, [y, *g], [y_ref, *g_ref], problem.names, sizes.tol)
            y_infer, _ = problem.run(impls["triton"], backward=False)
            check(name, [y_infer], [y_ref], ["output without grad"], sizes.tol)
        print(f"check {name}: max relative error (output, grads) {worst:.1e}", flush=True)
        rows_per_expert = seq * math.ceil(batch / group)
        flops = 3 * (
            4.0 * experts * rows_per_expert * sizes.d * hidden + 4.0 * batch * seq * experts * sizes.d
        )
        for impl_name, label in MOT_LABELS.items():
            step = partial(problem.run, impls[impl_name], True)
            ms, peak = timed(step, device)
            report.row(Row(name, "fwd+bwd", label, ms, flops, peak))
            if device.type == "cuda":
                report.row(Row(name, "graph", label, replayed(step), flops, None))


def mot_profiles(report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> None:
    """Each implementation's MoT training step, kernel by kernel."""
    for group, experts, hidden, batch, seq in sizes.mot:
        problem = MoTProblem(sizes, group, experts, hidden, batch, seq, device)
        name = mot_name(group, experts, hidden, batch, seq)
        for impl_name, label in MOT_LABELS.items():
            report.profile(f"{name}, fwd+bwd, {label}", partial(problem.run, impls[impl_name], True), device)


# ---------------------------------------------------------------------------------------------- launches


def host_ms(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call over ``calls`` back-to-back eager calls, synchronised once: the slower of the
    host and the GPU, so the host's time where each call's GPU work is a few microseconds."""
    fn()  # compile / autotune first
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def launch_rows(report: Report, sizes: Sizes, device: torch.device) -> None:
    """The host's cost of one launch at decode size: an ATen op, the fused routing step (one plain Triton
    launch) and the grouped GEMM on one row (one autotuned launch). The eager decode rows are host-bound;
    these say how much of them each kind of launch is."""
    from mixcompile_plugins.triton.grouped import Groups, matmul
    from mixcompile_plugins.triton.ops import fused_topk_route

    experts, top_k, hidden = sizes.moe[0]
    logits = torch.randn(1, experts, device=device)
    a = torch.randn(1, hidden, device=device, dtype=sizes.dtype)
    w = torch.randn(experts, sizes.d, hidden, device=device, dtype=sizes.dtype)
    one_row = Groups(torch.tensor([0] + [1] * experts, device=device, dtype=torch.int32), None, 1)
    steps = {
        "torch.softmax (ATen)": partial(torch.softmax, logits, -1),
        "fused_topk_route (Triton)": partial(fused_topk_route, logits, None, top_k, True),
        "grouped GEMM (Triton, autotuned)": partial(matmul, a, one_row, w, None, transposed=True),
    }
    calls = 1000 if device.type == "cuda" else 2
    workload = f"host time per launch, E={experts} 1 token"
    for name, fn in steps.items():
        report.row(Row(workload, "launch", name, host_ms(fn, device, calls), 0.0, None))


# ----------------------------------------------------------------------------------------------- report


def profile_steps(
    report: Report, sizes: Sizes, device: torch.device, moe_impls: dict[str, Callable], mot_impls: dict
) -> None:
    """Where each training step's GPU time goes, for every implementation of the MoE and MoT workloads: a
    section after the table's rows, so that a run cut short has those first."""
    moe_profiles(report, sizes, device, moe_impls)
    mot_profiles(report, sizes, device, mot_impls)


def fp32_rows(report: Report, sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> None:
    """One MoE workload in fp32 at "highest" (three-product TF32 dots against cuBLAS's fp32), rows and
    training step profiles."""
    moe_rows(report, sizes, device, impls, "fp32 ")
    moe_profiles(report, sizes, device, impls, "fp32 ")


def ratios(rows: list[Row]) -> list[float | None]:
    """Each row's time over the Triton kernel's in the same workload and pass (>1: Triton faster)."""
    triton_ms = {(r.workload, r.mode): r.ms for r in rows if r.impl == "triton"}
    base = [triton_ms.get((r.workload, r.mode)) for r in rows]
    return [r.ms / b if r.ms and b else None for r, b in zip(rows, base, strict=True)]


def table_line(r: Row, ratio: float | None) -> str:
    ms = f"{r.ms:10.3f}" if r.ms is not None else f"{'n/a':>10}"
    tflops = f"{r.flops / r.ms / 1e9:10.1f}" if r.ms else f"{'n/a':>10}"
    x = f"{ratio:10.2f}" if ratio else f"{'n/a':>10}"
    peak = f"{r.peak_gib:10.2f}" if r.peak_gib is not None else f"{'n/a':>10}"
    note = f"  ({r.note})" if r.note else ""
    return f"{r.workload:40} {r.mode:8} {r.impl:18}{ms}{tflops}{x}{peak}{note}"


def print_table(rows: list[Row]) -> None:
    """One table; ``x triton`` is each implementation's time over the Triton kernel's (>1: Triton faster)."""
    columns = ("workload", 40), ("pass", 8), ("implementation", 18)
    figures = ("ms", "TFLOP/s", "x triton", "peak GiB")
    header = " ".join(f"{c:{w}}" for c, w in columns) + "".join(f"{f:>10}" for f in figures)
    print(header)
    print("-" * len(header))
    for r, ratio in zip(rows, ratios(rows), strict=True):
        print(table_line(r, ratio))


class Report:
    """Every row and profile so far, printed as it is measured and written to the JSON file after each
    (a temporary file renamed over it: never half a file), so a run killed at its time limit keeps what it
    measured; ``complete`` lists the sections that finished. Runs the sections within the deadline."""

    def __init__(self, path: str | None, header: dict, deadline: float | None) -> None:
        self.path, self.header, self.deadline = path, header, deadline
        self.start = time.monotonic()
        self.rows: list[Row] = []
        self.profiles: dict[str, list[dict]] = {}  # "workload, pass, implementation" -> kernels, most first
        self.section = ""
        self.complete: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def row(self, row: Row) -> None:
        """A table row, printed after the run's elapsed seconds (where the time goes) as it is measured."""
        self.rows.append(replace(row, section=self.section))
        print(f"[{self.elapsed():4.0f} s] {table_line(row, ratios(self.rows)[-1])}", flush=True)
        self.write()

    def profile(self, name: str, fn: Callable[[], object], device: torch.device) -> None:
        """``fn`` profiled kernel by kernel (:func:`profiled`), printed and written once made."""
        profiled(self.profiles, name, fn, device)
        if name in self.profiles:
            print_profiles({name: self.profiles[name]})
            print(f"[{self.elapsed():4.0f} s] profiled {name}", flush=True)
            self.write()

    def run(self, name: str, section: Callable[[], None], need: float) -> None:
        """Runs one section, unless the deadline leaves it less than the seconds it ``need``s. One that
        raises is reported with its traceback, and the next runs: it may measure what this could not."""
        left = math.inf if self.deadline is None else self.deadline - self.elapsed()
        if left < need:
            print(
                f"-- {name}: skipped, needs about {need:.0f} s and {left:.0f} s are left of the deadline",
                flush=True,
            )
            self.skipped.append(name)
        else:
            print(f"-- {name}", flush=True)
            self.section, start = name, time.monotonic()
            try:
                section()
                self.complete.append(name)
            except Exception:  # noqa: BLE001 - said, counted as a failure, and the next section runs
                traceback.print_exc()
                self.failed.append(name)
            self.seconds[name] = round(time.monotonic() - start, 1)
            outcome = "done" if name in self.complete else "FAILED"
            print(f"-- {name}: {outcome} in {self.seconds[name]:.0f} s", flush=True)
        self.write()

    def write(self, finished: bool = False) -> None:
        """The JSON file, if asked for (a few milliseconds: rewritten after every row)."""
        if not self.path:
            return
        from mixcompile_plugins.triton import grouped

        table = [
            {**asdict(r), "tflops": r.flops / r.ms / 1e9 if r.ms else None, "x_triton": ratio}
            for r, ratio in zip(self.rows, ratios(self.rows), strict=True)
        ]
        doc = {
            **self.header, "ok": all(c.ok for c in CHECKS) and not self.failed, "finished": finished,
            "complete": self.complete, "skipped": self.skipped, "failed": self.failed,
            "section_seconds": self.seconds, "checks": [{**asdict(c), "ok": c.ok} for c in CHECKS],
            "rows": table, "profiles": self.profiles, "tuned": tuned_configs(grouped),
        }  # fmt: skip
        with open(f"{self.path}.tmp", "w") as f:
            json.dump(doc, f, indent=1, allow_nan=True)
        os.replace(f"{self.path}.tmp", self.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; on CPU through the Triton interpreter"
    )
    parser.add_argument("--json", help="write every figure and check to this file (after each row)")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable): a GPU session reruns the one its change is about in "
        "seconds, where the whole table takes minutes; each section measures its own references",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=os.environ.get("BENCH_DEADLINE"),
        metavar="SECONDS",
        help="skip each section that would not finish within this many seconds of the start (default: "
        "$BENCH_DEADLINE, else none): a run under a time limit exits on its own, with what it measured",
    )
    args = parser.parse_args(argv)
    only = set(args.only or SECTIONS)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_kernels: no CUDA device; nothing to benchmark (use --smoke to check the script on CPU).")
        return 0
    if not cuda:  # before Triton is first imported: it reads the variable when kernels are decorated
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    from mixcompile.runtime.kernels import get_kernel

    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if cuda else "cpu")
    triton_kernel, torch_kernel = get_kernel("triton"), get_kernel("torch")
    moe_impls: dict[str, Callable] = {"triton": triton_kernel.moe, "torch": torch_kernel.moe}
    if hasattr(torch, "_grouped_mm") and cuda:
        moe_impls["torch._grouped_mm"] = grouped_mm_moe
    mot_impls = {"triton": triton_kernel.mot, "torch": torch_kernel.mot}
    header = {
        "device": torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(sizes.dtype),
        "tokens": sizes.tokens,
        "d": sizes.d,
        "deadline": args.deadline,
    }
    print(
        f"{header['device']}, torch {torch.__version__}, triton {triton.__version__}, {sizes.dtype}, "
        f"{sizes.tokens} tokens, d={sizes.d}; fwd rows run under no_grad"
    )
    report = Report(args.json, header, args.deadline)
    fp32 = replace(sizes, moe=sizes.moe[:1], dtype=torch.float32)
    sections = {
        "moe": partial(moe_rows, report, sizes, device, moe_impls),
        "mot": partial(mot_rows, report, sizes, device, mot_impls),
        "decode": partial(decode_rows, report, sizes, device, moe_impls),
        "dense": partial(dense_rows, report, sizes, device),
        "launch": partial(launch_rows, report, sizes, device),
        "profile": partial(profile_steps, report, sizes, device, moe_impls, mot_impls),
        "routing": partial(routing_rows, report, sizes, device),
        "fp32": partial(
            fp32_rows, report, fp32, device, {"triton": triton_kernel.moe, "torch": torch_kernel.moe}
        ),
    }
    if args.smoke:
        del sections["fp32"]  # at "highest" on a GPU only
    needs = NEEDS["smoke" if args.smoke else "full"]
    for name in SECTIONS:
        if name in only and name in sections:
            report.run(name, sections[name], needs[name])
    print()
    print_table(report.rows)
    from mixcompile_plugins.triton import grouped

    print_tuned(tuned_configs(grouped))
    report.write(finished=True)
    if report.skipped:
        print(f"skipped for the deadline: {', '.join(report.skipped)} (rerun them with --only)")
    failed = [c for c in CHECKS if not c.ok]
    for c in failed:
        print(f"FAILED: {c.workload}: {c.tensor}: relative error {c.rel_err:.2e} (allowed {c.tol:.0e})")
    for name in report.failed:
        print(f"FAILED: section {name} raised (its traceback above)")
    return 1 if failed or report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
