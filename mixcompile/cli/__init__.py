"""The ``mixcompile`` command and what only it needs: the benchmark, the demo and its tiny GPT."""

from mixcompile.cli.startup import guard_imports

guard_imports()  # first: what follows imports torch, and `import mixcompile` starts here

from mixcompile.cli.main import entry_point, main  # noqa: E402

__all__ = ["entry_point", "main"]
