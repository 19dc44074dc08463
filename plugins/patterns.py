"""Built-in FFN patterns the compiler looks for."""

from mixcompile.hookspecs import Register, hookimpl


@hookimpl
def register_patterns(register: Register) -> None:
    pass
