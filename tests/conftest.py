"""Shared fixtures. Tests mirror the package: ``tests/<folder>/`` tests ``mixcompile/<folder>/``
(``kernels/`` the Triton kernel plugin, ``docs/`` the README and examples); ``zoo.py`` (models with known
FFNs), ``reference.py`` (float64 references) and ``distributed_workers.py`` (torchrun-style workers) are
helpers every test can import."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import mixcompile.plugins.manager as manager


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Reload plugins around a test, so entry points and env vars are re-read and nothing leaks."""
    manager.reset()
    yield monkeypatch
    manager.reset()
