"""Benchmark the fused Triton kernels against the torch reference, a dense FFN and ``torch._grouped_mm``.

On a GPU: first checks the Triton kernel against the torch reference at every benchmarked size (the output
with and without grad, and every gradient, with outputs poisoned with NaN so an unwritten element fails),
then prints one table (bf16, 16,384 tokens, d=1024) of time, TFLOP/s, the ratio to the Triton kernel and peak
memory, all measured in this run: a dense FFN (h=4096), the MoE and MoT workloads, decode-sized MoE forwards
(1 to 512 tokens; eager, where the host's time dominates, and replayed from a CUDA graph, pass "graph", for
the Triton kernel and ``torch._grouped_mm``), the routing's sort of the pairs alone (the counting sort with
and without ``pairs_per_token`` against the argsort-based sort it replaced), the host's time per launch (an
ATen op, a plain and an autotuned Triton kernel), and one MoE workload in fp32 at torch's default "highest"
matmul precision. MoE rows include routing (gate, softmax, top-k: the fused routing step for the Triton
kernel, as the block runs it); MoT rows include the controller, and their training step is also replayed from
a CUDA graph (pass "graph"), which says how much of its eager time is the host's. After the table, where each
training step's GPU time goes: every kernel's time per step, profiled for each implementation of the MoE and
MoT training steps (so the next change can aim at the largest). ``--json`` writes every figure, check and
profile to a file. Exits 1 if a check fails. ``--smoke`` runs tiny sizes, on CPU through Triton's
interpreter, to check that the script works; without a GPU and without ``--smoke`` it says so and exits.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
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
SECTIONS = ("dense", "moe", "mot", "decode", "routing", "launch", "fp32")  # the table's, in its order
SMOKE = Sizes(48, 32, 64, ((4, 2, 48),), ((2, 4, 32, 5, 6),), (1, 8), torch.float32)


@dataclass
class Row:
    workload: str
    mode: str
    impl: str
    ms: float | None
    flops: float
    peak_gib: float | None
    note: str = ""


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
PROFILES: dict[str, list[dict]] = {}  # "workload, pass, implementation" -> kernels, most time first


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


def replayed(fn: Callable[[], object]) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the
    GPU's time without the host's, which is what decode steps cost when captured (``torch.compile``'s
    ``mode="reduce-overhead"`` or a hand-made graph). None, with the reason, where capture fails."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a row saying why
        print(f"  not captured: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """``measure``, or no figure where an implementation cannot run here (``_grouped_mm`` before Hopper)."""
    try:
        return measure(fn, device)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        return None, None


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


def dense_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    """The dense FFN the MoE workloads are measured against (its TFLOP/s is the reference rate)."""
    x = torch.randn(sizes.tokens, sizes.d, device=device, dtype=sizes.dtype, requires_grad=True)
    dense = dense_ffn(sizes.d, sizes.dense_hidden, device, sizes.dtype)
    fwd_flops = 4.0 * sizes.tokens * sizes.d * sizes.dense_hidden
    rows = []
    for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3 * fwd_flops)):
        ms, peak = timed(partial(dense_step, dense, x, torch.randn_like(x), backward), device)
        rows.append(Row(f"dense FFN h={sizes.dense_hidden}", mode, "torch", ms, flops, peak))
    return rows


def moe_rows(sizes: Sizes, device: torch.device, impls: dict[str, Callable], prefix: str = "") -> list[Row]:
    rows = []
    for experts, top_k, hidden in sizes.moe:
        problem = MoEProblem(sizes, sizes.tokens, experts, top_k, hidden, device)
        name = f"{prefix}MoE E={experts} top-{top_k} h={hidden}"
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
                rows.append(Row(name, mode, impl_name, ms, flops, peak))
                if backward:
                    profiled(
                        PROFILES,
                        f"{name}, {mode}, {impl_name}",
                        partial(problem.run, impl, True, impl_name == "triton"),
                        device,
                    )
            step = partial(dense_step, dense, problem.x, problem.dy, backward)
            ms, peak = timed(step, device)
            rows.append(Row(name, mode, f"dense h={top_k * hidden}", ms, flops, peak, "no routing"))
    return rows


def decode_rows(sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> list[Row]:
    """Inference at decode sizes: where launch count and per-launch overhead, not FLOPs, set the time."""
    rows = []
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
            for impl_name, impl in impls.items():
                ms, peak = timed(partial(problem.run, impl, False, impl_name == "triton"), device)
                rows.append(Row(name, "fwd", impl_name, ms, flops, peak))
            for impl_name in ("triton", "torch._grouped_mm"):  # the decode target's pair, captured
                if device.type == "cuda" and impl_name in impls:
                    step = partial(problem.run, impls[impl_name], False, impl_name == "triton")
                    rows.append(Row(name, "graph", impl_name, replayed(step), flops, None))
    return rows


# --------------------------------------------------------------------------------------------- routing


def routing_rows(sizes: Sizes, device: torch.device) -> list[Row]:
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

    rows = []
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
                rows.append(Row(name, "sort", impl_name, timed(fn, device)[0], 0.0, None))
                if device.type == "cuda":
                    rows.append(Row(name, "graph", impl_name, replayed(fn), 0.0, None))
    return rows


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


def mot_rows(sizes: Sizes, device: torch.device, impls: dict[str, Callable]) -> list[Row]:
    rows = []
    for group, experts, hidden, batch, seq in sizes.mot:
        problem = MoTProblem(sizes, group, experts, hidden, batch, seq, device)
        name = f"MoT G={group} E={experts} h={hidden} (B={batch}, T={seq})"
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
        for impl_name in ("triton", "torch"):
            impl = impls[impl_name]
            ms, peak = timed(partial(problem.run, impl, True), device)
            label = "einsum reference" if impl_name == "torch" else impl_name
            rows.append(Row(name, "fwd+bwd", label, ms, flops, peak))
            profiled(PROFILES, f"{name}, fwd+bwd, {label}", partial(problem.run, impl, True), device)
            if device.type == "cuda":
                rows.append(
                    Row(name, "graph", label, replayed(partial(problem.run, impl, True)), flops, None)
                )
    return rows


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


def launch_rows(sizes: Sizes, device: torch.device) -> list[Row]:
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
    return [
        Row(workload, "launch", name, host_ms(fn, device, calls), 0.0, None) for name, fn in steps.items()
    ]


# ----------------------------------------------------------------------------------------------- report


def ratios(rows: list[Row]) -> dict[int, float | None]:
    """Each row's time over the Triton kernel's in the same workload and pass (>1: Triton faster)."""
    triton_ms = {(r.workload, r.mode): r.ms for r in rows if r.impl == "triton"}
    out = {}
    for i, r in enumerate(rows):
        base = triton_ms.get((r.workload, r.mode))
        out[i] = r.ms / base if r.ms and base else None
    return out


def print_table(rows: list[Row]) -> None:
    """One table; ``x triton`` is each implementation's time over the Triton kernel's (>1: Triton faster)."""
    columns = ("workload", 40), ("pass", 8), ("implementation", 18)
    figures = ("ms", "TFLOP/s", "x triton", "peak GiB")
    header = " ".join(f"{c:{w}}" for c, w in columns) + "".join(f"{f:>10}" for f in figures)
    print(header)
    print("-" * len(header))
    ratio = ratios(rows)
    for i, r in enumerate(rows):
        ms = f"{r.ms:10.3f}" if r.ms is not None else f"{'n/a':>10}"
        tflops = f"{r.flops / r.ms / 1e9:10.1f}" if r.ms else f"{'n/a':>10}"
        x = f"{ratio[i]:10.2f}" if ratio[i] else f"{'n/a':>10}"
        peak = f"{r.peak_gib:10.2f}" if r.peak_gib is not None else f"{'n/a':>10}"
        note = f"  ({r.note})" if r.note else ""
        print(f"{r.workload:40} {r.mode:8} {r.impl:18}{ms}{tflops}{x}{peak}{note}")


def write_json(path: str, header: dict, rows: list[Row], tuned: dict) -> None:
    ratio = ratios(rows)
    table = [
        {**asdict(r), "tflops": r.flops / r.ms / 1e9 if r.ms else None, "x_triton": ratio[i]}
        for i, r in enumerate(rows)
    ]
    checks = [{**asdict(c), "ok": c.ok} for c in CHECKS]
    doc = {
        **header, "ok": all(c.ok for c in CHECKS), "checks": checks, "rows": table, "profiles": PROFILES,
        "tuned": tuned,
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; on CPU through the Triton interpreter"
    )
    parser.add_argument("--json", help="write every figure and check to this file")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable): a GPU session reruns the one its change is about in "
        "seconds, where the whole table takes minutes; each section measures its own references",
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
    header = {
        "device": torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(sizes.dtype),
        "tokens": sizes.tokens,
        "d": sizes.d,
    }
    print(
        f"{header['device']}, torch {torch.__version__}, triton {triton.__version__}, {sizes.dtype}, "
        f"{sizes.tokens} tokens, d={sizes.d}; fwd rows run under no_grad"
    )
    fp32 = replace(sizes, moe=sizes.moe[:1], dtype=torch.float32)
    fp32_impls = {"triton": triton_kernel.moe, "torch": torch_kernel.moe}
    sections = {
        "dense": partial(dense_rows, sizes, device),
        "moe": partial(moe_rows, sizes, device, moe_impls),
        "mot": partial(mot_rows, sizes, device, mot_impls),
        "decode": partial(decode_rows, sizes, device, moe_impls),
        "routing": partial(routing_rows, sizes, device),
        "launch": partial(launch_rows, sizes, device),
        # fp32 at "highest": three-product TF32 dots against cuBLAS's fp32 (not in the smoke run)
        "fp32": partial(moe_rows, fp32, device, fp32_impls, "fp32 ") if not args.smoke else list,
    }
    rows = [row for name in SECTIONS if name in only for row in sections[name]()]
    print()
    print_table(rows)
    print_profiles(PROFILES)
    from mixcompile_plugins.triton import grouped

    tuned = tuned_configs(grouped)
    print_tuned(tuned)
    if args.json:
        write_json(args.json, header, rows, tuned)
    failed = [c for c in CHECKS if not c.ok]
    for c in failed:
        print(f"FAILED: {c.workload}: {c.tensor}: relative error {c.rel_err:.2e} (allowed {c.tol:.0e})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
