"""Where a step's GPU time goes, kernel by kernel (``torch.profiler``), for the benchmark scripts: the
figure that says which kernel the next change should aim at; and which tile each autotuned kernel chose."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def kernel_profile(fn: Callable[[], object], device: torch.device) -> list[dict]:
    """Each kernel's time per call of ``fn`` (five calls after one unprofiled), most first: GPU time on a
    GPU; on the CPU (smoke runs: one call, Triton in its interpreter) each op's own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    steps = 5 if cuda else 1
    fn()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [
        {"kernel": e.key, "calls": e.count / steps, "us": getattr(e, own) / steps}
        for e in prof.key_averages()
        if getattr(e, own) > 0
    ]
    return sorted(kernels, key=lambda k: -k["us"])


def profiled(
    profiles: dict[str, list[dict]], name: str, fn: Callable[[], object], device: torch.device
) -> None:
    """Records :func:`kernel_profile` of ``fn`` in ``profiles[name]``; a step that cannot run here
    (``_grouped_mm`` before Hopper) or a profiler that cannot record is said and left out, never fatal."""
    try:
        profiles[name] = kernel_profile(fn, device)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  not profiled: {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)


def print_profiles(profiles: dict[str, list[dict]], top: int = 6) -> None:
    """The ``top`` kernels of each profiled step, with their share of its profiled time."""
    for name, kernels in profiles.items():
        total = sum(k["us"] for k in kernels) or 1.0
        print(f"\n{name}: {total:.0f} us per step in {len(kernels)} kernels")
        for k in kernels[:top]:
            label = k["kernel"] if len(k["kernel"]) <= 70 else k["kernel"][:67] + "..."
            print(f"  {k['us']:9.1f} us {100 * k['us'] / total:5.1f}%  x{k['calls']:<4g} {label}")


def tuned_configs(module: ModuleType) -> dict[str, dict[str, str]]:
    """For each autotuned kernel of ``module``: the config it chose for each tuning key it met (its tuner's
    cache), as ``"BLOCK_MxBLOCK_NxBLOCK_K wW sS"``: which tile the timings above were measured with."""
    from triton.runtime.autotuner import Autotuner

    chosen = {}
    for name, tuner in sorted(vars(module).items()):
        if isinstance(tuner, Autotuner):
            chosen[name] = {str(key): _label(config) for key, config in tuner.cache.items()}
    return chosen


def _label(config: Any) -> str:  # a triton.Config
    m, n, k = (config.kwargs.get(f"BLOCK_{x}") for x in "MNK")
    return f"{m}x{n}x{k} w{config.num_warps} s{config.num_stages}"


def print_tuned(chosen: dict[str, dict[str, str]]) -> None:
    """How often each kernel chose each config."""
    print()
    for name, by_key in chosen.items():
        counts = Counter(by_key.values())
        picks = ", ".join(f"{label} x{n}" for label, n in counts.most_common()) or "nothing tuned"
        print(f"tuned {name}: {picks}")
