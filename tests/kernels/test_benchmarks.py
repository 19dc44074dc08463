"""The GPU benchmark script keeps working: its ``--smoke`` mode runs every row at tiny sizes on the CPU,
through Triton's interpreter, including the correctness checks it makes before timing and the profiles
it prints after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_kernel_benchmark_smoke_run() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [float(e) for e in re.findall(r"max relative error \(output, grads\) (\S+)", done.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-4, done.stdout
    table = [line for line in done.stdout.splitlines() if " us per step in " not in line]  # not the profiles
    rows = [line.split()[0] for line in table if line.startswith(("MoE", "MoT"))]
    assert rows.count("MoE") == 6 and rows.count("MoT") == 2, done.stdout
    # each implementation's training step profiled, kernel by kernel
    profile = re.compile(r"^(MoE|MoT) .*, fwd\+bwd, (.+): (\d+) us per step in (\d+) kernels$", re.M)
    profiles = profile.findall(done.stdout)
    assert sorted((kind, impl) for kind, impl, _, _ in profiles) == [
        ("MoE", "torch"), ("MoE", "triton"), ("MoT", "einsum reference"), ("MoT", "triton"),
    ], done.stdout  # fmt: skip
    assert all(int(us) > 0 and int(n) > 0 for *_, us, n in profiles), done.stdout


def test_only_runs_the_sections_named() -> None:
    """``--only`` (repeatable) runs those sections of the table and nothing else (the checks of the others
    included): how a GPU session reruns what its change is about."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), "--smoke", "--only", "launch", "--only", "routing"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    workloads = {line.split(",")[0].split(" E=")[0] for line in done.stdout.splitlines()}
    assert "host time per launch" in workloads and "routing" in workloads, done.stdout
    assert not {"MoE", "MoT", "decode", "dense FFN h=64", "check MoE"} & workloads, done.stdout
    assert "check " not in done.stdout, done.stdout
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--only", "moe2"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "invalid choice: 'moe2'" in done.stderr


def test_tuned_configs_name_the_tile_each_key_chose(monkeypatch, capsys) -> None:
    """The benchmarks report which config each autotuned kernel chose per tuning key: read from a tuner that
    tuned two keys (a fake kernel; a stand-in benchmark makes the large tile win only at the large size)."""
    triton = pytest.importorskip("triton")
    import torch

    from mixcompile_plugins.triton import tuning

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_profile

    class Kernel:  # runs nothing; remembers the meta-parameters of its last launch
        arg_names = ["x_ptr", "N"]

        def __init__(self) -> None:
            self.fn = lambda: None
            self.last: dict = {}

        def run(self, *args, **kwargs):
            self.last = kwargs

    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 1 << 20)
    monkeypatch.setattr(tuning, "compute_capability", lambda device: 90)
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    kernel = Kernel()
    tuner = tuning.Autotuner(kernel, configs, ["N"], lambda c, a: 0, lambda c, a: 0, None, False, False)
    tuner.cache_results = False  # no disk cache for a fake kernel

    def bench(call, quantiles):
        call()
        large = kernel.last["BLOCK_M"] == 128
        return [1.0 if large == (tuner.nargs["N"] > 16) else 2.0] * 3

    tuner._do_bench = bench
    x = torch.zeros(3)
    tuner.run(x, 64)
    tuner.run(x, 4)
    chosen = bench_profile.tuned_configs(types.SimpleNamespace(_k=tuner, other=object()))
    assert list(chosen) == ["_k"]
    by_n = {key.split(",")[0].strip("( "): label for key, label in chosen["_k"].items()}
    assert by_n == {"64": "128x256x64 w8 s3", "4": "64x64x64 w4 s4"}
    bench_profile.print_tuned(chosen)
    assert "tuned _k: 128x256x64 w8 s3 x1, 64x64x64 w4 s4 x1" in capsys.readouterr().out


def test_host_bound_rows_are_timed_in_turn(monkeypatch) -> None:
    """Decode rows are host time, which drifts over a run: on a GPU the implementations take turns, round
    after round, and each figure is the median of its rounds; one that cannot run here is said once and not
    timed again. (Timings stubbed: no GPU needed.)"""
    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_kernels

    calls: list[str] = []
    clock = iter(range(1, 1000))

    def timed(fn, device, rep=100):
        calls.append(fn())
        return (None, None) if calls[-1] == "grouped_mm" else (float(next(clock)), 0.25)

    monkeypatch.setattr(bench_kernels, "timed", timed)
    steps = {name: (lambda name=name: name) for name in ("triton", "grouped_mm", "torch")}
    got = bench_kernels.timed_in_turn(steps, torch.device("cuda"))
    rounds = bench_kernels.ROUNDS
    assert calls == ["triton", "grouped_mm", "torch"] + ["triton", "torch"] * (rounds - 1)
    middle = (rounds - 1) // 2 * 2  # round i gives triton 2i+1 and torch 2i+2
    assert got == {"triton": (middle + 1, 0.25), "grouped_mm": (None, None), "torch": (middle + 2, 0.25)}
    flaky = {"n": 0}

    def fails_later():  # runs in the first round only: keeps that round's time and peak
        flaky["n"] += 1
        return "triton" if flaky["n"] == 1 else "grouped_mm"

    assert bench_kernels.timed_in_turn({"triton": fails_later}, torch.device("cuda"))["triton"][1] == 0.25
    calls.clear()
    bench_kernels.timed_in_turn(steps, torch.device("cpu"))  # the smoke run: once each
    assert calls == ["triton", "grouped_mm", "torch"]
