"""What the per-call checks of plugin outputs cost, next to the block forward they guard.

Blocks check every router plan and kernel output on every call (structure always; routing index ranges in
eager forwards, one read back to the host, unless the plan lists the kernel's own top-k picks as they came
out), and NaN / duplicate pairs under ``mc.debug_checks()``. This times the checks themselves on the plans
and outputs of a real forward (the range check included), and the forward, in the same run. On a GPU the
range check's read back also waits for the work queued before it, so the host cannot run ahead of the GPU
past a MoE block: the "queued" columns time forwards issued back to back (one synchronisation at the end)
with the read back and without it. On an H100 (2026-11-28) that wait was 24-38% of the queued forwards'
time; since then the blocks here (the built-in ``topk`` router) skip it, so the two columns should agree.

    python benchmarks/bench_checks.py                   # CPU sizes (or --device cuda)
    python benchmarks/bench_checks.py --smoke           # tiny sizes, a few seconds
    python benchmarks/bench_checks.py --json out.json   # also write the rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from bench_kernels import host_ms

import mixcompile as mc
from mixcompile.runtime import checks as checks_module
from mixcompile.runtime.checks import check_mix_plan, check_output, check_routing_plan


def median_ms(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def queued_ms(step: Callable[[], object], repeats: int, device: torch.device, read_back: bool) -> float:
    """Milliseconds per call of ``repeats`` calls issued back to back, synchronised once; ``read_back=False``
    skips the range check's read back (as a compiled graph does)."""
    original = checks_module._can_read_back
    if not read_back:
        checks_module._can_read_back = lambda: False  # type: ignore[assignment]
    try:
        return host_ms(step, device, repeats)
    finally:
        checks_module._can_read_back = original


def moe_row(
    tokens: int, d: int, h: int, experts: int, top_k: int, device: torch.device, repeats: int
) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block = mc.MoEBlock(d, h, experts, top_k=top_k, device=device, dtype=dtype).eval()
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    kernel = block._kernel(x).kernel
    plan = block.router(x, kernel)
    y = kernel.moe(x, plan, block.experts)

    def checks() -> None:
        check_routing_plan(plan, source="router", num_tokens=tokens, num_experts=experts)
        check_output(y, x, "kernel")

    def debug() -> None:
        with mc.debug_checks():
            checks()

    with torch.no_grad():
        forward = median_ms(lambda: block(x), repeats, device)
        queued = [queued_ms(lambda: block(x), repeats, device, read_back) for read_back in (True, False)]
    return {
        "block": f"MoE N={tokens} d={d} h={h} E={experts} k={top_k}",
        "forward_ms": forward,
        "checks_ms": median_ms(checks, repeats, device),
        "debug_ms": median_ms(debug, repeats, device),
        "queued_ms": queued[0],
        "queued_no_read_back_ms": queued[1],
    }


def mot_row(
    batch: int, seq: int, d: int, h: int, experts: int, group: int, device: torch.device, repeats: int
) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block = mc.MoTBlock(d, h, experts, group_size=group, device=device, dtype=dtype).eval()
    x = torch.randn(batch, seq, d, device=device, dtype=dtype)
    x_g = x.reshape(batch // group, group, seq, d).permute(2, 0, 1, 3)
    present = torch.ones(batch // group, group, dtype=torch.bool, device=device)
    plan = block.mixer(x_g, present, sparse=False)
    shape = (seq, batch // group, group, experts)

    def checks() -> None:
        check_mix_plan(plan, source="mixer", shape=shape)
        check_output(x_g, x_g, "kernel")

    def debug() -> None:
        with mc.debug_checks():
            checks()

    with torch.no_grad():
        forward = median_ms(lambda: block(x), repeats, device)
    return {
        "block": f"MoT B={batch} T={seq} d={d} h={h} E={experts} G={group}",
        "forward_ms": forward,
        "checks_ms": median_ms(checks, repeats, device),
        "debug_ms": median_ms(debug, repeats, device),
        "queued_ms": None,  # a mix plan's checks read nothing back
        "queued_no_read_back_ms": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--json", help="write the device and the rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    repeats = 5 if args.smoke else 20
    if args.smoke:
        rows = [moe_row(64, 32, 64, 4, 2, device, repeats), mot_row(8, 16, 32, 32, 4, 4, device, repeats)]
    elif device.type == "cuda":  # bench_kernels.py's workloads (bf16): its tuned configs are reused
        rows = [
            moe_row(16384, 1024, 4096, 8, 2, device, repeats),
            moe_row(16384, 1024, 512, 64, 8, device, repeats),
            moe_row(8, 1024, 4096, 8, 2, device, 10 * repeats),  # decode-sized
            mot_row(16, 1024, 1024, 512, 32, 16, device, repeats),
        ]
    else:
        rows = [
            moe_row(2048, 256, 1024, 8, 2, device, repeats),
            moe_row(2048, 256, 128, 64, 8, device, repeats),
            moe_row(8, 256, 1024, 8, 2, device, 10 * repeats),  # decode-sized
            mot_row(16, 128, 256, 256, 32, 16, device, repeats),
        ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; median of {repeats}; per-call checks vs the block forward they guard")
    print(
        f"{'block':<44} {'forward ms':>11} {'checks ms':>10} {'share':>7} {'debug ms':>9} {'share':>7}"
        f" {'queued ms':>10} {'no read back':>13}"
    )
    for row in rows:
        share, debug_share = (100 * row[key] / row["forward_ms"] for key in ("checks_ms", "debug_ms"))
        queued = (
            f" {row['queued_ms']:>10.3f} {row['queued_no_read_back_ms']:>13.3f}"
            if row["queued_ms"] is not None
            else f" {'n/a':>10} {'n/a':>13}"
        )
        print(
            f"{row['block']:<44} {row['forward_ms']:>11.3f} {row['checks_ms']:>10.3f} {share:>6.1f}% "
            f"{row['debug_ms']:>9.3f} {debug_share:>6.1f}%{queued}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "smoke": args.smoke, "repeats": repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
