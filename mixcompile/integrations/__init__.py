"""Bridges between mixcompile and other libraries' model code.

Each bridge imports its library only when called, so ``import mixcompile`` stays as light as it is.

- :mod:`mixcompile.integrations.transformers_experts`: mixcompile's kernels as an experts implementation
  of Hugging Face transformers (``experts_implementation="mixcompile"``).
"""

from __future__ import annotations

from mixcompile.integrations.transformers_experts import (
    ExpertsLayout,
    experts_layout,
    experts_modules,
    register_transformers_experts,
)

__all__ = ["ExpertsLayout", "experts_layout", "experts_modules", "register_transformers_experts"]
