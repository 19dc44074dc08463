"""Benchmark mixcompile as a transformers experts implementation against transformers' own.

Real MoE layer shapes (Mixtral-8x7B: d=4096, h=14336, E=8, top-2; Qwen3-30B-A3B: d=2048, h=768, E=128,
top-8) at 16,384 tokens (prefill / training) and 1, 8, 64 tokens (decode). Each row runs the *same* HF
experts module (``MixtralExperts``, ``Qwen3MoeExperts``) with the same inputs and routing through
``experts_implementation`` = ``mixcompile`` (kernel ``auto``: Triton on CUDA), ``grouped_mm`` and
``batched_mm``, forward and forward+backward, and prints times and ratios measured in this run. Routing
(``top_k_index`` / ``top_k_weights``) is an input, as it is for the experts module, so it is not timed.

Before timing, every implementation's output and gradients are compared with ``grouped_mm`` at each size.
``mixcompile (pre-split)`` runs the same kernel on contiguous copies of the gate / up halves made outside
the timed region: the difference to ``mixcompile`` is what reading the fused ``gate_up_proj``'s halves in
place (strided weight operands) costs against separate contiguous stacks (see the README). After the table,
the forward+backward of ``mixcompile``, ``pre-split`` and ``grouped_mm`` at every size, kernel by kernel
(GPU time per step; also in the JSON).

    python benchmarks/bench_hf_experts.py --out hf_experts.json          # on a GPU
    python benchmarks/bench_hf_experts.py --only Qwen3-30B-A3B:1,8       # one shape, some sizes
    python benchmarks/bench_hf_experts.py --smoke --out smoke.json       # tiny sizes, CPU, interpreter

``--smoke`` runs every row once at tiny sizes on the CPU (Triton through its interpreter) in float32:
its timings mean nothing, it checks that the script works and that the implementations agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from bench_graphs import replayed
from bench_profile import print_profiles, print_tuned, profiled, tuned_configs


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # transformers model family whose experts class is benchmarked
    d: int
    h: int
    experts: int
    top_k: int


FULL_SHAPES = (
    Shape("Mixtral-8x7B", "mixtral", 4096, 14336, 8, 2),
    Shape("Qwen3-30B-A3B", "qwen3_moe", 2048, 768, 128, 8),
)
FULL_TOKENS = (16384, 64, 8, 1)
SMOKE_SHAPES = (
    Shape("Mixtral-tiny", "mixtral", 32, 48, 8, 2),
    Shape("Qwen3-tiny", "qwen3_moe", 16, 8, 16, 4),
)
SMOKE_TOKENS = (16, 1)
IMPLEMENTATIONS = ("mixcompile", "mixcompile (pre-split)", "grouped_mm", "batched_mm")
BASELINE = "grouped_mm"
PROFILED = ("mixcompile", "mixcompile (pre-split)", "grouped_mm")  # forward+backward, kernel by kernel


@dataclass
class Row:
    shape: str
    tokens: int
    implementation: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    fwd_peak_gib: float | None
    fwd_bwd_peak_gib: float | None
    error: str | None = None
    fwd_graph_ms: float | None = None  # replayed from a CUDA graph: the GPU's time alone (decode sizes)
    fwd_bwd_graph_ms: float | None = None


def build_experts(shape: Shape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's experts module at this shape, random weights (``std 1/sqrt(fan_in)``)."""
    if shape.family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        config = MixtralConfig(
            hidden_size=shape.d, intermediate_size=shape.h, num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
        )  # fmt: skip
        cls = MixtralExperts
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config = Qwen3MoeConfig(
            hidden_size=shape.d, moe_intermediate_size=shape.h, num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
        )  # fmt: skip
        cls = Qwen3MoeExperts
    with torch.device("meta"):
        module = cls(config)
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            std = param.shape[-1] ** -0.5
            param.copy_((torch.randn(param.shape, generator=g) * std).to(dtype))
    return module


def routing(tokens: int, shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax → top-k → renormalise on random logits (as Mixtral / Qwen3 route)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    probs = torch.randn(tokens, shape.experts, generator=g).softmax(-1)
    weights, index = probs.topk(shape.top_k, dim=-1)
    return index.to(device), (weights / weights.sum(-1, keepdim=True)).to(device)


def measure(fn: Callable[[], object], device: torch.device, rep: int = 50) -> tuple[float, float | None]:
    """Median milliseconds over ``rep`` ms of calls and peak memory (GiB) above what was allocated before;
    once on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, None
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"), peak


# Below this many tokens a call is mostly the host's time, which drifts by up to 0.5 ms over a run on the
# GPU machine (2026-11-27/28): there the implementations are timed in turn, round after round, and each
# figure is the median of its rounds, so a drift cannot favour the one timed first.
DECODE_TOKENS = 1024
DECODE_ROUNDS = 5
GRAPHED = ("mixcompile", "grouped_mm")  # decode sizes, also replayed from a CUDA graph


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Runner:
    """Runs one experts module through one implementation; ``pre-split`` swaps in contiguous halves."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        self.module, self.x, self.index, self.weights = module, x, index, weights
        self.dy = torch.randn_like(x)
        self._presplit: Any = None

    def implementation(self, name: str) -> str:
        return "mixcompile_presplit" if name == "mixcompile (pre-split)" else name

    def forward(self, name: str, grad: bool) -> torch.Tensor:
        """One call; with ``grad`` a training step (forward, backward) after ``zero_grad(set_to_none=True)``:
        the expert weights' gradients are the backward's own tensors, not added into the last step's (an
        elementwise pass over every expert's weights, 45-70% of a decode-sized step on an H100)."""
        self.module.config._experts_implementation = self.implementation(name)
        if grad:
            self.module.zero_grad(set_to_none=True)
        x = self.x.detach().requires_grad_(grad)
        w = self.weights.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = self.module(x, self.index, w)
        if grad:
            y.backward(self.dy)
        return y

    def grads(self, name: str) -> dict[str, torch.Tensor]:
        self.module.zero_grad(set_to_none=True)
        self.module.config._experts_implementation = self.implementation(name)
        x = self.x.detach().requires_grad_()
        w = self.weights.detach().requires_grad_()
        y = self.module(x, self.index, w)
        y.backward(self.dy)
        out = {"output": y.detach(), "x": x.grad, "weights": w.grad}
        out.update({n: p.grad for n, p in self.module.named_parameters()})
        self.module.zero_grad(set_to_none=True)
        return out


def register_presplit() -> None:
    """``mixcompile_presplit``: the mixcompile forward on contiguous copies of the gate / up views, made once
    (outside any timing), to measure what reading the strided views in place costs."""
    from transformers.integrations.moe import ExpertsInterface

    from mixcompile.integrations import transformers_experts as te

    cache: dict[int, Any] = {}

    def presplit_forward(self, hidden_states, top_k_index, top_k_weights):
        layout = te.experts_layout(self)
        key = id(self)
        if key not in cache:
            view = te.experts_view(self, layout)
            tensors = {n: getattr(view, n) for n in ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")}
            cache[key] = te.ExpertsView(
                **{
                    n: None if t is None else t.detach().contiguous().requires_grad_()
                    for n, t in tensors.items()
                },
                activation=view.activation,
            )
        plan = te.routing_plan(top_k_index, top_k_weights, layout.num_experts)
        _, kernel = te.resolve_kernel("auto", "moe", hidden_states.device, hidden_states.dtype)
        return kernel.moe(hidden_states, plan, cache[key]).to(hidden_states.dtype)

    ExpertsInterface.register("mixcompile_presplit", presplit_forward)


MAX_GATHER_GIB = 16.0


def skip_reason(name: str, shape: Shape, tokens: int, dtype: torch.dtype) -> str | None:
    """batched_mm gathers every pair's expert weights (``gate_up_proj[expert_ids]``): where that alone would
    take more than MAX_GATHER_GIB, the row says so instead of running out of memory."""
    if name != "batched_mm":
        return None
    gathered = tokens * shape.top_k * 3 * shape.h * shape.d * torch.finfo(dtype).bits / 8 / 2**30
    return (
        f"skipped: batched_mm would gather {gathered:,.0f} GiB of weights"
        if gathered > MAX_GATHER_GIB
        else None
    )


def check(runner: Runner, names: tuple[str, ...], skipped: set[str]) -> dict[str, float | str]:
    """Largest relative error of each implementation against grouped_mm (output and every gradient)."""
    reference = runner.grads(BASELINE)
    errors: dict[str, float | str] = {}
    for name in names:
        if name in (BASELINE, "mixcompile (pre-split)") or name in skipped:  # pre-split's grads go to copies
            continue
        try:
            got = runner.grads(name)
        except Exception as exc:  # noqa: BLE001 - reported, and the row fails the run below
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        errors[name] = max(rel_err(got[k], v) for k, v in reference.items())
    return errors


def selection(only: list[str] | None, shapes: tuple[Shape, ...]) -> dict[str, tuple[int, ...]] | None:
    """``--only`` values as {shape name: token counts (empty: all)}; None runs everything."""
    if not only:
        return None
    names = [s.name for s in shapes]
    chosen: dict[str, tuple[int, ...]] = {}
    for item in only:
        name, _, counts = item.partition(":")
        if name not in names:
            raise ValueError(f"--only: unknown shape {name!r}; the shapes are {', '.join(names)}")
        try:
            tokens = tuple(int(t) for t in counts.split(",")) if counts else ()
        except ValueError:
            raise ValueError(f"--only {item!r}: token counts are integers, e.g. {name}:1,8") from None
        if any(t < 1 for t in tokens):
            raise ValueError(f"--only {item!r}: token counts must be at least 1")
        chosen[name] = chosen.get(name, ()) + tokens
    return chosen


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    from mixcompile.integrations import register_transformers_experts

    register_transformers_experts()
    register_presplit()
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    all_tokens = SMOKE_TOKENS if args.smoke else FULL_TOKENS
    if args.only is not None:
        shapes = tuple(s for s in shapes if s.name in args.only)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    rows: list[Row] = []
    checks: list[dict[str, Any]] = []
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}), Triton interpreter",
        "smoke": args.smoke,
        "timings_meaningful": not args.smoke and cuda,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "routing_timed": False,
        "complete": False,
        "checks": checks,
        "rows": [],
        "profiles": {},
    }
    for shape in shapes:
        module = build_experts(shape, device, dtype)
        token_counts = (args.only or {}).get(shape.name) or all_tokens
        for tokens in token_counts:
            g = torch.Generator(device="cpu").manual_seed(2)
            x = (torch.randn(tokens, shape.d, generator=g) * 0.5).to(device, dtype)
            runner = Runner(module, x, *routing(tokens, shape, device))
            skips = {n: why for n in IMPLEMENTATIONS if (why := skip_reason(n, shape, tokens, dtype))}
            errors = check(runner, IMPLEMENTATIONS, set(skips))
            checks.append({"shape": shape.name, "tokens": tokens, "max_rel_error_vs_grouped_mm": errors})
            bad = {k: v for k, v in errors.items() if not (isinstance(v, float) and v <= tolerance)}
            print(f"{shape.name} {tokens} tokens: max relative error vs {BASELINE} (output, grads) {errors}")
            if bad:
                raise SystemExit(
                    f"bench_hf_experts: {bad} exceed {tolerance} at {shape.name}, {tokens} tokens"
                )
            rows.extend(timed_rows(runner, shape, tokens, skips, device))
            for name in PROFILED:
                if name not in skips and not _failed(rows, shape, tokens, name):
                    key = f"{shape.name}, {tokens} tokens, fwd+bwd, {name}"
                    profiled(result["profiles"], key, lambda r=runner, n=name: r.forward(n, True), device)
                module.zero_grad(set_to_none=True)
            result["rows"] = [asdict(r) for r in rows]
            save(result)  # after every size: a run cut short keeps what it measured
            if cuda and tokens < DECODE_TOKENS:  # last: a failed capture cannot cost the eager rows
                graph_rows(runner, rows, shape, tokens)
                result["rows"] = [asdict(r) for r in rows]
                save(result)
        del module
        if cuda:
            torch.cuda.empty_cache()
    result["complete"] = True
    save(result)
    return result


def timed_rows(
    runner: Runner, shape: Shape, tokens: int, skips: dict[str, str], device: torch.device
) -> list[Row]:
    """One row per implementation: forward and forward+backward times and peaks. At decode sizes on a GPU
    the implementations take turns for ``DECODE_ROUNDS`` rounds (the median of each one's rounds)."""
    rounds = DECODE_ROUNDS if device.type == "cuda" and tokens < DECODE_TOKENS else 1
    rep = 50 // rounds
    times: dict[str, tuple[list[float], list[float]]] = {}
    rows = {n: Row(shape.name, tokens, n, None, None, None, None, skips.get(n)) for n in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name, row in rows.items():
            if row.error:
                continue
            try:
                with torch.no_grad():
                    fwd, row.fwd_peak_gib = measure(lambda n=name: runner.forward(n, False), device, rep)
                both, row.fwd_bwd_peak_gib = measure(lambda n=name: runner.forward(n, True), device, rep)
            except Exception as exc:  # noqa: BLE001 - an implementation that fails is a row saying why
                row.error = f"{type(exc).__name__}: {exc}"
                continue
            finally:
                runner.module.zero_grad(set_to_none=True)
            times.setdefault(name, ([], []))[0].append(fwd)
            times[name][1].append(both)
    for name, (fwd_ms, both_ms) in times.items():
        if not rows[name].error:
            rows[name].fwd_ms, rows[name].fwd_bwd_ms = statistics.median(fwd_ms), statistics.median(both_ms)
    return list(rows.values())


def graph_rows(runner: Runner, rows: list[Row], shape: Shape, tokens: int) -> None:
    """Fills the graph columns of ``GRAPHED``'s rows at this size: the GPU's time without the host's."""
    for row in rows:
        here = (row.shape, row.tokens) == (shape.name, tokens)
        if here and row.implementation in GRAPHED and not row.error:
            row.fwd_graph_ms = replayed(lambda n=row.implementation: runner.forward(n, False))
            row.fwd_bwd_graph_ms = replayed(lambda n=row.implementation: runner.forward(n, True))
            runner.module.zero_grad(set_to_none=True)


def _failed(rows: list[Row], shape: Shape, tokens: int, name: str) -> bool:
    return any(r.error for r in rows if (r.shape, r.tokens, r.implementation) == (shape.name, tokens, name))


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    base = {(r["shape"], r["tokens"]): r for r in rows if r["implementation"] == BASELINE}
    versions = f"torch {result['torch']}, transformers {result['transformers']}"
    print(f"\n{result['device']}, {versions}, {result['dtype']}")
    graphs = any(r.get("fwd_graph_ms") for r in rows)
    header = f"{'implementation':<24} {'fwd ms':>9} {'x':>6} {'fwd+bwd ms':>11} {'x':>6}"
    if graphs:
        header += f" {'graph fwd':>10} {'x':>6} {'graph f+b':>10} {'x':>6}"
    print(f"{'shape':<15} {'tokens':>6} {header}")
    for r in rows:
        if r["error"]:
            print(f"{r['shape']:<15} {r['tokens']:>6} {r['implementation']:<24} {r['error'][:70]}")
            continue
        b = base.get((r["shape"], r["tokens"]))

        def cell(key: str, width: int, r: dict = r, b: dict | None = b) -> str:
            ratio = f"{b[key] / r[key]:.2f}" if b and b.get(key) and r.get(key) else "-"
            return f"{r[key]:>{width}.3f} {ratio:>6}" if r.get(key) else f"{'-':>{width}} {'-':>6}"

        line = f"{r['shape']:<15} {r['tokens']:>6} {r['implementation']:<24} "
        line += f"{cell('fwd_ms', 9)} {cell('fwd_bwd_ms', 11)}"
        if graphs:
            line += f" {cell('fwd_graph_ms', 10)} {cell('fwd_bwd_graph_ms', 10)}"
        print(line)
    print(f"x = {BASELINE} time / this time (higher is faster than {BASELINE}); forward+backward after")
    print("zero_grad(set_to_none=True); graph: replayed from a CUDA graph, the GPU's time without the host's")
    if not result["timings_meaningful"]:
        print("(smoke run: the timings mean nothing)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU, Triton through its interpreter"
    )
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument(
        "--only",
        action="append",
        metavar="SHAPE[:TOKENS]",
        help="run only this shape (by name, e.g. Qwen3-30B-A3B), at these token counts if given "
        "(Qwen3-30B-A3B:1,8); repeatable",
    )
    args = parser.parse_args(argv)
    try:
        args.only = selection(args.only, SMOKE_SHAPES if args.smoke else FULL_SHAPES)
    except ValueError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available():
        if not args.smoke:
            print(
                "bench_hf_experts: no CUDA device; nothing to benchmark (--smoke checks the script on CPU)."
            )
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported (transformers imports it)

    def save(result: dict[str, Any]) -> None:
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)

    result = run(args, save)
    from mixcompile_plugins.triton import grouped

    result["tuned"] = tuned_configs(grouped)
    save(result)
    print_table(result)
    print_profiles(result["profiles"])
    print_tuned(result["tuned"])
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
