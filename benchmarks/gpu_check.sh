#!/usr/bin/env bash
# The kernels' GPU checks in one call (at most 8 minutes on one H100), every figure in $OUT/gpu_check.json:
#   1. tests/kernels/test_kernel_gpu.py: Triton against float64 PyTorch at real sizes (MoE E8 k2 and E64 k8, MoT G16
#      E32; d=1024), fp32 (highest and TF32) and bf16, output with and without grad and every gradient;
#      torch.compile(fullgraph=True) with inductor; CUDA-graph capture and replay; transformers' fused and
#      transposed expert weights read in place.
#   2. benchmarks/bench_kernels.py: its correctness pre-check at every benchmarked size, then the table (bf16,
#      16,384 tokens, d=1024), section by section, the kernel notes' targets first: MoE E8 k2 h4096 and E64
#      k8 h512 with torch._grouped_mm, MoT G16 / G32 E32 h512 against the einsum reference (eager and
#      CUDA graph), decode rows at 1/8/64/512 tokens; then a dense FFN h=4096, the host's time per launch,
#      each implementation's MoE and MoT training step profiled kernel by kernel, the routing's sort alone
#      against the argsort-based one it replaced, an fp32 row. It gets what is left of the 8 minutes once
#      hf_experts and the checks have their seconds (HF_SECONDS, CHECKS_SECONDS below; at most 260 s), starts
#      no section it cannot finish 15 s before that limit (--deadline; the sections skipped are printed and
#      in the JSON, for a rerun with --only), and writes its JSON after every row, so a kill loses nothing.
#   3. benchmarks/bench_hf_experts.py (when transformers is installed): Mixtral-8x7B and Qwen3-30B-A3B experts
#      modules through experts_implementation="mixcompile" against transformers' grouped_mm and batched_mm,
#      checked against grouped_mm first (decode sizes timed in turn over five rounds, and replayed from a CUDA
#      graph), then each size's forward+backward profiled kernel by kernel (168 s on an H100 before the rounds
#      and graphs, which add about 10 s), in the time left of the 8 minutes.
#   4. benchmarks/bench_checks.py, if 40 seconds are left: what the blocks' per-call checks cost, and forwards
#      queued back to back with and without the range check's read back to the host (which waits for the GPU).
# Exits non-zero if a test or a correctness check fails, or a stage runs out of its time.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU; OUT defaults to ./gpu_out
#   SMOKE=1 bash benchmarks/gpu_check.sh          # or --smoke: tiny sizes on the CPU, Triton's interpreter
# (about 2.5 minutes on an idle machine; its stages get 15 minutes each, for busy CI machines)
# tests/kernels/test_triton_kernels.py (every activation, ragged plans, autocast) runs on a GPU as it is, separately.
# After a fix, rerun only what it is about: bench_kernels.py --only SECTION, bench_hf_experts.py --only SHAPE[:TOKENS].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
SMOKE=${SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PYTHON=${PYTHON:-python3}  # the GPU image's python3 holds PyTorch; pass PYTHON= for another
# Seconds kept for the stages after the benchmark (on the H100, 2026-11-28: hf_experts 168 s, the checks 19 s,
# which run only if 40 s are left); HF_SECONDS=0 gives the benchmark up to 260 s and hf_experts the rest.
HF_SECONDS=${HF_SECONDS:-175}
CHECKS_SECONDS=40
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES="$OUT/stages.tsv"
: > "$STAGES"

stage() {  # name, seconds allowed, command...: runs it, records its exit status and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (up to ${limit}s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$STAGES"
    return $rc
}

# The project, if this Python does not have it yet (offline: no dependencies fetched; the GPU image has them).
"$PYTHON" -c "import mixcompile, mixcompile_plugins" 2>/dev/null \
    || "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 2

HAS_HF=$("$PYTHON" -c "import transformers" 2>/dev/null && echo 1 || echo 0)
SMOKE_ARGS=$([[ $SMOKE == 1 ]] && echo --smoke)

status=0
if [[ $SMOKE == 1 ]]; then
    echo "gpu_check: smoke run on the CPU (Triton interpreter, tiny sizes)"
    stage tests_gpu 900 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_gpu.py \
        --junitxml="$OUT/tests_gpu.xml" || status=1
    BENCH_LIMIT=900
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    stage tests_gpu 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_gpu.py \
        --junitxml="$OUT/tests_gpu.xml" || status=1
    # What is left of 8 minutes (SECONDS: bash's own clock) after the later stages' seconds, 60 to 260 s.
    BENCH_LIMIT=$(( 470 - SECONDS - HAS_HF * HF_SECONDS - CHECKS_SECONDS ))
    BENCH_LIMIT=$(( BENCH_LIMIT > 260 ? 260 : BENCH_LIMIT < 60 ? 60 : BENCH_LIMIT ))
fi
# shellcheck disable=SC2086  # SMOKE_ARGS is empty or one flag
stage bench "$BENCH_LIMIT" "$PYTHON" benchmarks/bench_kernels.py $SMOKE_ARGS --deadline $(( BENCH_LIMIT - 15 )) \
    --json "$OUT/bench.json" || status=1
HF_LIMIT=$(( SMOKE == 1 ? 900 : 470 - SECONDS ))
if (( HAS_HF == 0 )); then
    echo "== hf_experts: skipped (transformers is not installed)"
elif (( HF_LIMIT < 60 )); then
    echo "== hf_experts: skipped (less than a minute left of the 8)"
    status=1
else
    # shellcheck disable=SC2086  # SMOKE_ARGS is empty or one flag
    stage hf_experts "$HF_LIMIT" "$PYTHON" benchmarks/bench_hf_experts.py $SMOKE_ARGS \
        --out "$OUT/hf_experts.json" || status=1
fi
CHECKS_LIMIT=$(( SMOKE == 1 ? 900 : 470 - SECONDS ))
if (( CHECKS_LIMIT < CHECKS_SECONDS )); then
    echo "== checks: skipped (less than $CHECKS_SECONDS seconds left of the 8 minutes)"
else
    # shellcheck disable=SC2086  # SMOKE_ARGS is empty or one flag
    stage checks "$CHECKS_LIMIT" "$PYTHON" benchmarks/bench_checks.py $SMOKE_ARGS --json "$OUT/checks.json" \
        || status=1
fi

"$PYTHON" - "$OUT" "$SMOKE" "$status" <<'EOF'
"""Merge the stages, the test reports and the benchmark into one JSON file."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, smoke, status = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
doc = {
    "smoke": smoke, "ok": status == 0, "stages": {}, "tests": {}, "bench": None, "hf_experts": None,
    "checks": None,
}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    doc["stages"][name] = {"rc": int(rc), "seconds": int(seconds), "timed_out": int(rc) in (124, 137)}
for xml in sorted(out.glob("tests_*.xml")):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    doc["tests"][xml.stem] = {**counts, "seconds": float(suite.get("time", 0)), "failed": failed}
for name in ("bench", "hf_experts", "checks"):
    if (out / f"{name}.json").exists():
        doc[name] = json.loads((out / f"{name}.json").read_text())
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
bench = doc["bench"] or {}
if not bench.get("finished", True):
    print(f"bench: cut short; sections complete: {', '.join(bench['complete']) or 'none'}")
elif bench.get("skipped"):
    print(f"bench: skipped for its deadline: {', '.join(bench['skipped'])} (rerun them with --only)")
print(f"gpu_check: {'ok' if doc['ok'] else 'FAILED'}; figures in {out / 'gpu_check.json'}")
EOF
exit $status
