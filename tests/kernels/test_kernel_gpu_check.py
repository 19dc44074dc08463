"""``benchmarks/gpu_check.sh`` keeps working: its smoke mode runs every stage at tiny sizes on the CPU
(through Triton's interpreter) and writes one JSON file with the stages, the test reports and every
benchmark figure and check."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_smoke_mode(tmp_path):
    pytest.importorskip("triton")
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("gpu_check.sh needs bash and coreutils' timeout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SMOKE="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["smoke"] and doc["ok"]
    stages = {"tests_gpu": 0, "bench": 0, "checks": 0}
    if importlib.util.find_spec("transformers") is not None:
        stages["hf_experts"] = 0
        hf = doc["hf_experts"]
        assert hf["complete"] and hf["smoke"] and {r["implementation"] for r in hf["rows"]} >= {"mixcompile"}
    assert {n: s["rc"] for n, s in doc["stages"].items()} == stages
    checks = doc["checks"]
    assert checks["smoke"] and {r["block"].split()[0] for r in checks["rows"]} == {"MoE", "MoT"}
    moe = next(r for r in checks["rows"] if r["block"].startswith("MoE"))
    assert all(moe[k] > 0 for k in ("forward_ms", "checks_ms", "queued_ms", "queued_no_read_back_ms"))
    tests = doc["tests"]["tests_gpu"]
    assert tests["tests"] >= 8 and tests["failures"] == tests["errors"] == 0 and not tests["failed"]
    bench = doc["bench"]
    assert bench["ok"] and bench["device"] == "CPU (Triton interpreter)"
    workloads = {r["workload"].split()[0] for r in bench["rows"]}
    assert workloads == {"dense", "MoE", "MoT", "decode", "routing", "host"}  # host: time per launch
    assert all(r["ms"] is not None and r["ms"] > 0 for r in bench["rows"])
    checked = {c["tensor"] for c in bench["checks"]}
    expected = {"output", "output without grad", "grad x", "grad gate", "grad w_in", "grad w_out", "order"}
    assert expected <= checked
    assert all(c["ok"] and c["rel_err"] <= c["tol"] for c in bench["checks"])
