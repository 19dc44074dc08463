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


def test_train_lm(tmp_path: Path) -> None:
    stdout = run_example("train_lm.py", "--steps", "4", "--eval-every", "2", "--out", tmp_path, cwd=tmp_path)
    assert logged_models(tmp_path / "log.csv") == {"dense", "moe", "mot"}
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "steps to dense final" in stdout and "tokens/s" in stdout and "peak MiB" in stdout
    assert table_rows(stdout) >= {"dense", "moe", "mot"}


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
