"""The examples run end to end, as a user runs them (a subprocess each), at the smallest sizes that still
reach every code path: training, evaluation, the CSV log, the plot and the printed table."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# One thread: at these sizes a second gains nothing, and on a busy 2-core machine its spin-waiting makes
# the runs several times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_example(script: str, *args: str | Path, cwd: Path) -> str:
    """The example's stdout; a failure shows its stderr."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def table_rows(stdout: str) -> set[str]:
    """The first word of every printed line: a table's rows start with their model's name."""
    return {line.split()[0] for line in stdout.splitlines() if line.strip()}


def logged_models(log: Path) -> set[str]:
    with open(log, newline="") as handle:
        return {row["model"] for row in csv.DictReader(handle)}


def small_batch_losses(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["evaluation"]: float(row["val_loss"]) for row in csv.DictReader(handle)}


TRAIN_LM_PHASES = {"dense", "moe", "mot", "mot-more", "mot-anneal", "mot-to-tc"}


def check_train_lm_outputs(out: Path, stdout: str) -> None:
    """Every output of train_lm.py, and two facts its small-batch table must show at any size: at batch 1
    both small-batch policies compute the same thing (a lone sequence is its own group), and the Token
    Choice model gives the same loss whatever the batch."""
    assert logged_models(out / "log.csv") == TRAIN_LM_PHASES
    assert (out / "curves.png").stat().st_size > 0
    assert "reaches dense final at" in stdout and "tokens/s" in stdout and "peak MiB" in stdout
    assert table_rows(stdout) >= {"dense", "moe", "mot"}
    summary = (out / "summary.txt").read_text()
    assert "reaches dense final at" in summary and "MoT, held-out loss" in summary
    losses = small_batch_losses(out / "small_batch.csv")
    assert abs(losses['batch 1, small_batch="group"'] - losses['batch 1, small_batch="sparse"']) < 2e-4
    tuned = [loss for what, loss in losses.items() if what.startswith("token choice, tuned")]
    assert len(tuned) == 2 and abs(tuned[0] - tuned[1]) < 2e-4


def test_train_lm(tmp_path: Path) -> None:
    stdout = run_example("train_lm.py", "--steps", "4", "--eval-every", "2", "--out", tmp_path, cwd=tmp_path)
    check_train_lm_outputs(tmp_path, stdout)


def test_train_lm_gpu_preset_runs_shrunk(tmp_path: Path) -> None:
    """The GPU preset's own structure (groups of 32, 64 experts, batch 64, every phase), at toy widths."""
    shrink = ["d_model=32", "n_head=2", "n_layer=2", "d_ff=64", "seq=16", "steps=3", "eval_batches=1"]
    sets = [arg for pair in shrink for arg in ("--set", pair)]
    stdout = run_example("train_lm.py", "--preset", "gpu", *sets, "--out", tmp_path, cwd=tmp_path)
    check_train_lm_outputs(tmp_path, stdout)
    assert "group_size=32" in stdout and "experts=64" in stdout and "batch=64" in stdout


def test_upcycle_finetune(tmp_path: Path) -> None:
    stdout = run_example(
        "upcycle_finetune.py", "--steps", "2", "--pretrain-steps", "2", "--out", tmp_path, cwd=tmp_path
    )
    assert logged_models(tmp_path / "log.csv") == {"pretrain", "dense", "moe", "mot"}
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "upcycled MoE at step 0 equals dense" in stdout
    assert table_rows(stdout) >= {"dense", "moe", "mot"}


def test_hf_convert(tmp_path: Path) -> None:
    saved = tmp_path / "llama-moe"
    stdout = run_example("hf_convert.py", "--out", saved, cwd=tmp_path)
    for check in ("logits, dense vs MoE", "generated tokens, dense vs MoE", "logits, saved vs loaded"):
        assert f"{check}: equal" in stdout
    assert "MoT (groups of 2 sequences) runs forward" in stdout
    assert {p.name for p in saved.iterdir()} >= {"mixcompile.json", "model.safetensors"}
