"""The GPU benchmark script keeps working: its ``--smoke`` mode runs every row at tiny sizes on the CPU,
through Triton's interpreter, including the correctness checks it makes before timing and the profiles
it prints after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
