"""The ``mixcompile`` command and what only it needs: the benchmark, the demo and its tiny GPT."""

from mixcompile.cli.main import entry_point, main

__all__ = ["entry_point", "main"]
