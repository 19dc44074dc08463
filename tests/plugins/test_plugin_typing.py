"""A plugin author's type checker sees a factory of the wrong shape: each hook's ``register`` is typed for
its kind (``mc.RouterRegister``, ``mc.InitializerRegister``, ...). Runs mypy on two small plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
ROOT = Path(__file__).resolve().parents[2]

GOOD = """
import torch
import mixcompile as mc


class FirstExperts(mc.LearnedRouter):
    def forward(self, x: torch.Tensor, kernel: mc.Kernel) -> mc.RoutingPlan:
        chosen = torch.arange(self.top_k).expand(x.shape[0], -1)
        weights = torch.full(chosen.shape, 1.0 / self.top_k)
        return self.token_choice_plan(self.logits(x), chosen, weights)


def zeros(
    experts: mc.StackedExperts, dense: mc.DenseFFN | None, *, generator: torch.Generator | None
) -> None:
    for param in experts.parameters():
        param.data.zero_()


class Plugin:
    @mc.hookimpl
    def register_routers(self, register: mc.RouterRegister) -> None:
        register("first", FirstExperts)

    @mc.hookimpl
    def register_initializers(self, register: mc.InitializerRegister) -> None:
        register("zeros", zeros)
"""

BAD = """
import mixcompile as mc


class NotARouter:
    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        pass


def no_generator(experts: mc.StackedExperts, dense: mc.DenseFFN | None) -> None:
    pass


class Plugin:
    @mc.hookimpl
    def register_routers(self, register: mc.RouterRegister) -> None:
        register("not_a_router", NotARouter)
        register("a_kernel", mc.Kernel)

    @mc.hookimpl
    def register_initializers(self, register: mc.InitializerRegister) -> None:
        register("no_generator", no_generator)
"""


def test_mypy_strict_sees_factories_of_the_wrong_shape(tmp_path) -> None:
    (tmp_path / "good_plugin.py").write_text(GOOD)
    (tmp_path / "bad_plugin.py").write_text(BAD)
    # An editable install is found through an import hook mypy does not run: point it at the sources.
    env = {**os.environ, "MYPYPATH": os.pathsep.join([str(ROOT), str(ROOT / ".ci" / "mypy-path")])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-incremental",
            "good_plugin.py",
            "bad_plugin.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("good_plugin.py")], done.stdout
    assert [e.split(":")[1] for e in errors] == ["17", "18", "22"], done.stdout
    assert '"RouterRegister" has incompatible type "type[NotARouter]"' in errors[0]
    assert '"RouterRegister" has incompatible type "type[Kernel]"' in errors[1]
    assert 'expected "Initializer"' in errors[2]
