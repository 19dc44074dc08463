"""Every ```python example in the README runs as written."""

import re
from pathlib import Path

import pytest

import mixcompile.plugins.manager as registry

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("source", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry.reset()
    try:
        exec(compile(source, str(README), "exec"), {"__name__": "readme_example"})
    finally:
        registry.reset()
