"""The ``mixcompile`` command and what only it needs: the benchmark, the demo and what it reads off models.

``import mixcompile`` does not import this package (its import guard, :mod:`mixcompile.startup`, is
installed by the package root, before torch)."""

from mixcompile.cli.main import entry_point, main

__all__ = ["entry_point", "main"]
