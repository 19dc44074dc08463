"""A plugin author's type checker sees a factory of the wrong shape: each hook's ``register`` is typed for
its kind (``mc.RouterRegister``, ``mc.InitializerRegister``, ...). Runs mypy on two small plugins."""

from __future__ import annotations

import os
import re
import shlex
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


def test_the_readmes_mypy_command_checks_its_plugin_example_from_outside_the_checkout(tmp_path) -> None:
    """The command the README gives plugin authors, run as written (checkout paths filled in) from a
    directory of their own on the README's plugin example: mixcompile's own files, read through MYPYPATH,
    are checked under the author's settings, not the project's, and must stay out of the report."""
    readme = (ROOT / "README.md").read_text()
    plugins = readme[readme.index("## Plugins") : readme.index("## Saving and loading")]
    command = re.search(r"`(MYPYPATH=\S+ mypy [^`]+)`", plugins)
    example = re.search(r"```python\n(.*?)```", plugins, flags=re.DOTALL)
    assert command is not None and example is not None
    (tmp_path / "your_plugin.py").write_text(example.group(1))
    assignment, program, *arguments = shlex.split(command.group(1).replace("/path/to/mixcompile", str(ROOT)))
    assert program == "mypy"
    variable, _, value = assignment.partition("=")

    def mypy(*command_line: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, variable: value}
        run = [sys.executable, "-m", "mypy", *command_line]
        return subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = mypy(*arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 1 source file" in done.stdout
    # and the example plugin package the README points to (examples/third_party_plugin)
    package = ROOT / "examples" / "third_party_plugin" / "mixcompile_cosine"
    done = mypy(*arguments[:-1], str(package / "__init__.py"))
    assert done.returncode == 0, done.stdout + done.stderr
