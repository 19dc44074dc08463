"""Triton for the tests that run a kernel both ways: interpreter mode where there is no GPU."""

from __future__ import annotations

import importlib

import pytest


def import_triton(device: str) -> str | None:
    """Import Triton and the kernels (``TRITON_INTERPRET=1`` on the CPU); why Triton tests skip, if so."""
    with pytest.MonkeyPatch.context() as mp:
        if device == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        try:
            triton = importlib.import_module("triton")
        except ImportError:
            return "triton is not installed"
        importlib.import_module("mixcompile_plugins.triton.ops")
    if device == "cpu" and type(triton.language.cdiv).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 could be set; run this test file on its own"
    return None
