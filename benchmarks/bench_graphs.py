"""Timing a step replayed from a CUDA graph, for the benchmark scripts: the GPU's time without the host's,
which is what a step costs when captured (``torch.compile(mode="reduce-overhead")`` or a hand-made graph),
beside the eager rows, where the host's time per launch shows."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch

GRAPH_MS = 5.0  # GPU time per timed replay: enough calls unrolled that a replay's own launch is noise
GRAPH_REPLAYS = 10


def replayed(fn: Callable[[], object]) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph. One call is captured and replayed to size
    the graph that is timed (``GRAPH_MS`` of calls, at most 100), replayed ``GRAPH_REPLAYS`` times: tens of
    milliseconds a row, where ``triton.testing.do_bench_cudagraph(rep=50)`` unrolled 50 ms of eager calls
    and replayed them ten times. None, with the reason, where capture fails."""
    try:
        one_ms = replay_ms(captured(fn, 1), 1, 3)
        calls = max(1, min(100, int(GRAPH_MS / max(one_ms, 1e-3))))
        return replay_ms(captured(fn, calls), calls, GRAPH_REPLAYS)
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a row saying why
        print(f"  not captured: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return None


def captured(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` in one CUDA graph, after one eager call on the capture's stream (what
    PyTorch asks: a stream's first use may set up state that capture cannot). The garbage collector is off
    during capture: a collected Triton kernel unloads its module, which would invalidate the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    graph = torch.cuda.CUDAGraph()
    gc.disable()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    finally:
        gc.enable()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, calls: int, replays: int) -> float:
    """Median milliseconds per call over ``replays`` replays after an untimed one, each timed by events."""
    graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / calls
